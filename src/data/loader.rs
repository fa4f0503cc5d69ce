//! Batches for training and evaluation. Training batches are augmented by worker threads and handed
//! over in order through bounded channels, so the trainer never waits for data while the workers keep a
//! few batches ahead. Everything random is drawn from the seed, the epoch and the batch's index, so a
//! run resumed in the middle of an epoch sees exactly the batches it would have seen, and every thread
//! count builds the same batches, bit for bit.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::augment::{Augment, BatchAugment, Draw};
use super::{normalize_into, Split, IMAGE_PIXELS};

/// One batch: normalized images (n x 1 x 28 x 28) and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub epoch: usize,
    /// Index of the batch within its epoch.
    pub index: usize,
    pub input: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoaderConfig {
    pub seed: u64,
    pub batch_size: usize,
    /// The per-image augmentation at this strength (None: normalization only).
    pub augment: Option<Augment>,
    pub batch_augment: BatchAugment,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A generator for one purpose (`what`) of one (seed, epoch, batch).
fn rng_for(seed: u64, what: u64, epoch: usize, batch: usize) -> Xoshiro256PlusPlus {
    let key = splitmix64(splitmix64(splitmix64(seed ^ what) ^ epoch as u64) ^ batch as u64);
    Xoshiro256PlusPlus::seed_from_u64(key)
}

/// The order of the training set in `epoch`.
pub fn epoch_order(seed: u64, epoch: usize, len: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..len as u32).collect();
    order.shuffle(&mut rng_for(seed, 1, epoch, 0));
    order
}

/// Number of batches in an epoch (the last one may be smaller, as PyTorch's DataLoader does).
pub fn batches_per_epoch(len: usize, batch_size: usize) -> usize {
    len.div_ceil(batch_size)
}

/// Builds training batch `index` of `epoch`: the images at those places of the epoch's order,
/// augmented, batch-augmented when asked, normalized.
pub fn train_batch(split: &Split, order: &[u32], cfg: &LoaderConfig, epoch: usize, index: usize) -> Batch {
    let start = index * cfg.batch_size;
    let picks = &order[start..(start + cfg.batch_size).min(order.len())];
    let mut rng = rng_for(cfg.seed, 2, epoch, index);
    let mut pixels = vec![0.0f32; picks.len() * IMAGE_PIXELS];
    let mut scratch = vec![0.0f32; IMAGE_PIXELS];
    let labels: Vec<u8> = picks.iter().map(|&i| split.labels[i as usize]).collect();
    for (img, &i) in pixels.chunks_exact_mut(IMAGE_PIXELS).zip(picks) {
        for (o, &p) in img.iter_mut().zip(split.image(i as usize)) {
            *o = p as f32 / 255.0;
        }
        if let Some(a) = &cfg.augment {
            Draw::random(&mut rng, a).apply(img, &mut scratch);
        }
    }
    if cfg.batch_augment.any() {
        cfg.batch_augment.apply(&mut pixels, &labels, &mut rng);
    }
    for v in pixels.iter_mut() {
        *v = (*v - super::MEAN) / super::STD;
    }
    Batch { epoch, index, input: pixels, labels }
}

/// The training batches of one epoch, in order, as worker threads build them, or built on the
/// caller's thread as they are asked for (see [`spawn_epoch`]).
pub struct EpochBatches {
    source: Source,
    next: usize,
    failure: LoaderFailure,
}

enum Source {
    /// Worker k builds the epoch's batches first + k, first + k + workers, ...
    Workers(Vec<Receiver<Batch>>),
    /// No threads (a web page without cross-origin isolation has none): batch `first + next` is
    /// built when asked for.
    Inline { split: Arc<Split>, order: Vec<u32>, cfg: LoaderConfig, epoch: usize, first: usize, total: usize },
}

/// Why a loader thread died, if one did: the iterator then ends early, and the trainer asks here.
#[derive(Clone, Default)]
pub struct LoaderFailure(Arc<Mutex<Option<String>>>);

impl LoaderFailure {
    fn record(&self, what: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(what);
    }

    /// The first worker's death, in words.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl EpochBatches {
    /// Where a worker's death is recorded (keep it: the iterator goes to the trainer).
    pub fn failure(&self) -> LoaderFailure {
        self.failure.clone()
    }
}

impl Iterator for EpochBatches {
    type Item = Batch;

    /// The next batch in order; None after the last (or when a worker is gone).
    fn next(&mut self) -> Option<Batch> {
        let batch = match &self.source {
            Source::Workers(workers) => workers[self.next % workers.len()].recv().ok()?,
            Source::Inline { split, order, cfg, epoch, first, total } => {
                let index = first + self.next;
                (index < *total).then(|| train_batch(split, order, cfg, *epoch, index))?
            }
        };
        self.next += 1;
        Some(batch)
    }
}

/// Starts `threads` workers that build the training batches of `epoch` from batch `first` on, taking
/// turns, about `ahead` batches in advance all together; with 0 threads the batches are built on the
/// caller's thread as it asks for them. The batches come out in order and equal [`train_batch`]'s
/// whatever the thread count. The workers stop when the iterator is dropped.
pub fn spawn_epoch(
    split: Arc<Split>,
    cfg: LoaderConfig,
    epoch: usize,
    first: usize,
    ahead: usize,
    threads: usize,
) -> EpochBatches {
    let total = batches_per_epoch(split.len(), cfg.batch_size);
    let failure = LoaderFailure::default();
    if threads == 0 {
        let order = epoch_order(cfg.seed, epoch, split.len());
        return EpochBatches { source: Source::Inline { split, order, cfg, epoch, first, total }, next: 0, failure };
    }
    let order = Arc::new(epoch_order(cfg.seed, epoch, split.len()));
    let workers = (0..threads)
        .map(|k| {
            let (tx, rx) = sync_channel(ahead.div_ceil(threads).max(1));
            let (split, order, died) = (split.clone(), order.clone(), failure.clone());
            let work = move || {
                // A panic ends this worker's batches; the trainer reports it instead of a short epoch.
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    for index in (first + k..total).step_by(threads) {
                        if tx.send(train_batch(&split, &order, &cfg, epoch, index)).is_err() {
                            return;
                        }
                    }
                }));
                if let Err(payload) = built {
                    let why = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    died.record(format!("loader thread {k} of epoch {} died: {why}", epoch + 1));
                }
            };
            if let Err(e) = std::thread::Builder::new().name(format!("loader {k} epoch {epoch}")).spawn(work) {
                // The dropped sender ends the batches at this worker's first turn.
                failure.record(format!("cannot start loader thread {k}: {e}"));
            }
            rx
        })
        .collect();
    EpochBatches { source: Source::Workers(workers), next: 0, failure }
}

/// The loader threads to use by default: one per core. The training thread mostly waits (for the
/// device, or for batches), and the workers stop when they are far enough ahead, so leaving a core to
/// it costs more than sharing: on 2 cores the GPU training loop with the device's work skipped runs
/// ~1.2x faster with 2 workers than with 1 (`bench --host-only`).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().max(1))
}

/// The evaluation batches of a split, in order: normalization only.
pub fn eval_batches(split: &Split, batch_size: usize) -> impl Iterator<Item = Batch> + '_ {
    (0..batches_per_epoch(split.len(), batch_size)).map(move |index| {
        let range = index * batch_size..((index + 1) * batch_size).min(split.len());
        let mut input = vec![0.0f32; range.len() * IMAGE_PIXELS];
        normalize_into(&split.images[range.start * IMAGE_PIXELS..range.end * IMAGE_PIXELS], &mut input);
        Batch { epoch: 0, index, input, labels: split.labels[range].to_vec() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(n: usize) -> Split {
        Split {
            images: (0..n * IMAGE_PIXELS).map(|i| (i % 251) as u8).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
        }
    }

    #[test]
    fn epochs_shuffle_differently_and_reproducibly() {
        let a = epoch_order(1, 0, 1000);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>(), "a permutation");
        assert_ne!(a, epoch_order(1, 1, 1000));
        assert_ne!(a, epoch_order(2, 0, 1000));
        assert_eq!(a, epoch_order(1, 0, 1000));
    }

    #[test]
    fn worker_batches_equal_direct_ones_and_resume_mid_epoch() {
        let s = Arc::new(split(250));
        let cfg = LoaderConfig {
            seed: 3,
            batch_size: 100,
            augment: Some(Augment::default()),
            batch_augment: BatchAugment::default(),
        };
        let all: Vec<Batch> = spawn_epoch(s.clone(), cfg, 2, 0, 2, 1).collect();
        assert_eq!(all.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![100, 100, 50]);
        let order = epoch_order(3, 2, 250);
        assert_eq!(all[1], train_batch(&s, &order, &cfg, 2, 1));
        let resumed: Vec<Batch> = spawn_epoch(s, cfg, 2, 1, 2, 1).collect();
        assert_eq!(&resumed[..], &all[1..]);
    }

    /// Any number of workers builds the single-threaded path's batches, in order, bit for bit, from
    /// the start of an epoch and from the middle; more workers than batches too, and none (the
    /// batches built on the caller's thread, as in the web page).
    #[test]
    fn every_thread_count_builds_the_same_batches() {
        let s = Arc::new(split(730));
        let batch_augment = BatchAugment { swell: true, darken: true, squeeze: true };
        let cfg = LoaderConfig { seed: 5, batch_size: 64, augment: Some(Augment::default()), batch_augment };
        let one: Vec<Batch> = spawn_epoch(s.clone(), cfg, 1, 0, 4, 1).collect();
        assert_eq!(one.len(), 12);
        for threads in [0, 2, 3, 7, 16] {
            let many: Vec<Batch> = spawn_epoch(s.clone(), cfg, 1, 0, 4, threads).collect();
            assert!(many == one, "{threads} threads built other batches");
            let resumed: Vec<Batch> = spawn_epoch(s.clone(), cfg, 1, 5, 4, threads).collect();
            assert!(resumed[..] == one[5..], "{threads} threads resumed at batch 5 built other batches");
        }
    }

    #[test]
    fn unaugmented_batches_are_normalized_images() {
        let s = split(20);
        let cfg = LoaderConfig { seed: 3, batch_size: 20, augment: None, batch_augment: BatchAugment::default() };
        let order: Vec<u32> = (0..20).collect();
        let b = train_batch(&s, &order, &cfg, 0, 0);
        let e: Vec<Batch> = eval_batches(&s, 8).collect();
        assert_eq!(e.len(), 3);
        assert_eq!(b.input[..8 * IMAGE_PIXELS], e[0].input[..]);
        assert!((b.input[5] - (5.0 / 255.0 - super::super::MEAN) / super::super::STD).abs() < 1e-6);
    }
}
