//! Chunks of batches streamed to the GPU without stalls. A chunk (many batches of one size) is written
//! with one copy into one of [`SLOTS`] mapped upload buffers, recorded as many steps into one encoder
//! and submitted once; the running metrics are copied into the slot's small read-back buffer at the
//! chunk's end. Both buffers are mapped again asynchronously behind the submission, so the host fills
//! the next chunk while the GPU runs this one, and picks up a chunk's metrics once it has finished,
//! without waiting for anything else. At most [`IN_FLIGHT`] chunks are queued at once.

use std::collections::VecDeque;

use anyhow::{anyhow, bail, Context, Result};
use web_time::Instant;

use super::context::{GpuContext, MapFlag};
use super::net::{Metrics, METRICS_WORDS};

const METRICS_BYTES: u64 = 4 * METRICS_WORDS as u64;

/// Chunks submitted and not yet finished, at most: the GPU always has the next one queued.
pub const IN_FLIGHT: usize = 2;
/// Upload buffers: one per chunk in flight, and one the host fills meanwhile.
pub const SLOTS: usize = IN_FLIGHT + 1;

const WAITING: u8 = MapFlag::WAITING;
const MAPPED: u8 = MapFlag::MAPPED;
const FAILED: u8 = MapFlag::FAILED;

struct Slot {
    upload: wgpu::Buffer,
    upload_mapped: MapFlag,
    readback: wgpu::Buffer,
    readback_mapped: MapFlag,
    /// The submission that last used the slot's buffers.
    last_use: Option<wgpu::SubmissionIndex>,
}

/// What a chunk is, for the running sums it leaves and the pace it measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Train,
    Eval,
}

struct Pending {
    slot: usize,
    submission: wgpu::SubmissionIndex,
    kind: ChunkKind,
    batches: usize,
    /// Batches of its kind since the last reset, this chunk's included.
    through: usize,
    submitted: Instant,
}

/// Running sums copied back after a chunk: loss sum and correct count, and the batches they cover.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    pub kind: ChunkKind,
    pub batches: usize,
    pub metrics: Metrics,
}

#[derive(Default)]
pub struct Stream {
    slots: Vec<Slot>,
    next_slot: usize,
    pending: VecDeque<Pending>,
    /// Batches submitted per kind since the last reset.
    submitted: [usize; 2],
    /// The latest finished chunk's sums.
    pub latest: Option<Finished>,
    /// Measured seconds per batch of each kind (submission to finish, so an upper bound).
    pace: [Option<f64>; 2],
}

fn kind_index(kind: ChunkKind) -> usize {
    match kind {
        ChunkKind::Train => 0,
        ChunkKind::Eval => 1,
    }
}

fn upload_buffer(ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("chunk upload"),
        size: bytes.max(4),
        usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: true,
    })
}

impl Stream {
    /// Submits one chunk: waits until fewer than [`IN_FLIGHT`] chunks are queued, lets `fill` write the
    /// chunk's `bytes` into the next upload buffer, lets `record` record its `batches` batches (reading
    /// from that buffer), copies `metrics` (the running loss and correct count) behind them, and submits.
    #[allow(clippy::too_many_arguments)]
    pub async fn submit(
        &mut self,
        ctx: &GpuContext,
        kind: ChunkKind,
        batches: usize,
        bytes: u64,
        metrics: &wgpu::Buffer,
        fill: impl FnOnce(&mut wgpu::BufferViewMut),
        record: impl FnOnce(&mut wgpu::CommandEncoder, &wgpu::Buffer),
    ) -> Result<()> {
        while self.pending.len() >= IN_FLIGHT {
            self.finish_oldest(ctx).await?;
        }
        if self.slots.len() < SLOTS {
            self.slots.push(Slot {
                upload: upload_buffer(ctx, bytes),
                upload_mapped: MapFlag::new(MAPPED),
                readback: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("chunk metrics"),
                    size: METRICS_BYTES,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                readback_mapped: MapFlag::new(WAITING),
                last_use: None,
            });
        }
        let index = self.next_slot;
        self.next_slot = (self.next_slot + 1) % SLOTS;
        let slot = &mut self.slots[index];
        // The slot's last chunk has finished (at most IN_FLIGHT are queued), so its map is at most a
        // poll away.
        if let Some(last) = slot.last_use.clone() {
            let mapped = &slot.upload_mapped;
            ctx.wait_for(Some(last), || mapped.get() != WAITING).await?;
        }
        match slot.upload_mapped.get() {
            MAPPED => {}
            FAILED => return Err(ctx.fault_or(anyhow!("mapping a chunk upload buffer failed"))),
            _ => bail!("a chunk upload buffer was not mapped after its last use finished"),
        }
        if slot.upload.size() < bytes {
            slot.upload.unmap();
            slot.upload = upload_buffer(ctx, bytes);
        }
        {
            let mut view =
                slot.upload.slice(..bytes).get_mapped_range_mut().context("writing a chunk upload buffer")?;
            fill(&mut view);
        }
        slot.upload.unmap();
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        record(&mut encoder, &slot.upload);
        encoder.copy_buffer_to_buffer(metrics, 0, &slot.readback, 0, METRICS_BYTES);
        let submission = ctx.queue.submit([encoder.finish()]);
        // A kernel or buffer that failed validation while being recorded is reported by now.
        ctx.check()?;
        slot.upload_mapped.map(&slot.upload, wgpu::MapMode::Write);
        slot.readback_mapped.map(&slot.readback, wgpu::MapMode::Read);
        slot.last_use = Some(submission.clone());
        let k = kind_index(kind);
        self.submitted[k] += batches;
        self.pending.push_back(Pending {
            slot: index,
            submission,
            kind,
            batches,
            through: self.submitted[k],
            submitted: Instant::now(),
        });
        Ok(())
    }

    /// Picks up the chunks that have finished, without waiting.
    pub fn poll(&mut self, ctx: &GpuContext) -> Result<()> {
        ctx.poll(wgpu::PollType::Poll)?;
        while let Some(p) = self.pending.front() {
            if self.slots[p.slot].readback_mapped.get() == WAITING {
                break;
            }
            self.take_oldest(ctx)?;
        }
        Ok(())
    }

    /// Waits for every chunk submitted so far and picks them up.
    pub async fn drain(&mut self, ctx: &GpuContext) -> Result<()> {
        while !self.pending.is_empty() {
            self.finish_oldest(ctx).await?;
        }
        Ok(())
    }

    async fn finish_oldest(&mut self, ctx: &GpuContext) -> Result<()> {
        let Some(p) = self.pending.front() else { return Ok(()) };
        let mapped = &self.slots[p.slot].readback_mapped;
        ctx.wait_for(Some(p.submission.clone()), || mapped.get() != WAITING).await?;
        self.take_oldest(ctx)
    }

    /// Reads the oldest chunk's metrics (its read-back buffer must be mapped by now).
    fn take_oldest(&mut self, ctx: &GpuContext) -> Result<()> {
        let p = self.pending.pop_front().expect("a pending chunk");
        let slot = &self.slots[p.slot];
        match slot.readback_mapped.get() {
            MAPPED => {}
            FAILED => return Err(ctx.fault_or(anyhow!("reading the running metrics back failed"))),
            _ => bail!("a chunk finished but its metrics were not mapped"),
        }
        let words: Vec<u32> = {
            let view = slot.readback.slice(..).get_mapped_range().context("reading the running metrics")?;
            view.chunks_exact(4).map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]])).collect()
        };
        slot.readback.unmap();
        let seconds = p.submitted.elapsed().as_secs_f64() / p.batches.max(1) as f64;
        self.pace[kind_index(p.kind)] = Some(seconds);
        self.latest = Some(Finished { kind: p.kind, batches: p.through, metrics: Metrics::from_words(&words) });
        Ok(())
    }

    /// Waits for everything in flight, then starts the running counts of both kinds over (the caller
    /// zeroes the metrics buffer).
    pub async fn reset(&mut self, ctx: &GpuContext) -> Result<()> {
        self.drain(ctx).await?;
        self.submitted = [0; 2];
        self.latest = None;
        Ok(())
    }

    /// The batches per chunk that keep a chunk near `target_seconds` at the measured pace (one until a
    /// chunk of that kind has been measured), at most `limit`.
    pub fn batches_per_chunk(&self, kind: ChunkKind, target_seconds: f64, limit: usize) -> usize {
        match self.pace[kind_index(kind)] {
            Some(s) if s > 0.0 => ((target_seconds / s) as usize).clamp(1, limit.max(1)),
            _ => 1,
        }
    }
}
