//! Device setup through raw wgpu: list adapters, pick one, open a device with the adapter's own limits
//! and the optional features we use, and move f32 data in and out. Nothing here assumes a backend.
//!
//! Waiting for the GPU is awaited ([`GpuContext::wait_for`]): natively it blocks in `device.poll`; in a
//! web page, where nothing may block and maps complete only from the browser's event loop, it yields
//! to that loop until the map or submission it waits for has finished.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};
use wgpu::util::DeviceExt;

/// What to install when there is no adapter at all.
pub const INSTALL_HINT: &str = "no GPU adapter found. wgpu needs a Vulkan, Metal or DX12 driver; \
on Linux without a GPU install Mesa's software Vulkan driver (lavapipe): \
`sudo apt-get install -y mesa-vulkan-drivers`";

/// One adapter as `adapters` lists it.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

/// All backends, unless wgpu's own environment variables (WGPU_BACKEND=vulkan,metal,dx12,gl, ...) narrow them.
#[cfg(not(target_arch = "wasm32"))]
fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::all();
    wgpu::Instance::new(desc.with_env())
}

#[cfg(not(target_arch = "wasm32"))]
fn all_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all().with_env()))
}

#[cfg(not(target_arch = "wasm32"))]
fn summary(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    AdapterSummary {
        index,
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
    }
}

/// Every adapter wgpu finds, in its order (the order `--adapter N` refers to).
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters() -> Vec<AdapterSummary> {
    all_adapters(&instance()).iter().enumerate().map(|(i, a)| summary(i, a)).collect()
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
/// Prefer real GPUs: discrete, then integrated, then virtual, then software.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// The backend names `--adapter NAME:BACKEND` takes, as wgpu's `Backend` prints them, lowercased.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
const BACKEND_NAMES: &[&str] = &["vulkan", "gl", "metal", "dx12"];

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
/// The adapter `choice` names among `adapters`: an index; part of a name (case-insensitive), the first
/// match; or part of a name, a colon and a backend (`llvmpipe:gl`), which tells apart one device seen
/// through two backends.
fn choose(adapters: &[wgpu::AdapterInfo], choice: &str) -> Option<usize> {
    if let Ok(i) = choice.parse::<usize>() {
        return (i < adapters.len()).then_some(i);
    }
    let (name, backend) = match choice.rsplit_once(':') {
        Some((name, b)) if BACKEND_NAMES.contains(&b.to_lowercase().as_str()) => (name, Some(b.to_lowercase())),
        _ => (choice, None),
    };
    adapters.iter().position(|a| {
        a.name.to_lowercase().contains(&name.to_lowercase())
            && backend.as_ref().is_none_or(|b| format!("{:?}", a.backend).to_lowercase() == *b)
    })
}

/// An open device and its queue (a clone shares them).
#[derive(Clone)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// Whether timestamp queries are available (per-kernel profiling).
    pub timestamps: bool,
    faults: Faults,
}

/// What the GPU reported outside any call's result: a validation error, running out of memory, or the
/// device lost. The run ends with it at the next check (`GpuContext::check`).
#[derive(Debug)]
pub struct GpuFailure(pub String);

impl std::fmt::Display for GpuFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the GPU failed: {}", self.0)
    }
}

impl std::error::Error for GpuFailure {}

/// The first fault wgpu reported through our handlers (wgpu's default handler panics); later ones
/// mostly follow from it, so they are kept out of the message.
#[derive(Clone, Default)]
struct Faults(Arc<Mutex<Option<String>>>);

impl Faults {
    fn record(&self, what: String) {
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(what);
        }
    }

    fn first(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A wgpu error in a line: its kind and wgpu's own account, which names the kernel (pipeline, pass)
/// or buffer by its label when it knows it.
fn describe_error(e: &wgpu::Error) -> String {
    let account = |source: &(dyn std::error::Error + 'static)| {
        let mut text = source.to_string();
        let mut next = source.source();
        while let Some(cause) = next {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            next = cause.source();
        }
        text
    };
    match e {
        wgpu::Error::OutOfMemory { source } => format!("out of GPU memory ({})", account(source.as_ref())),
        wgpu::Error::Validation { source, .. } => format!("validation error: {}", account(source.as_ref())),
        wgpu::Error::Internal { source, .. } => format!("internal error: {}", account(source.as_ref())),
    }
}

impl GpuContext {
    /// Opens the adapter `choice` names (an index from `adapters`, or part of a name, case-insensitive),
    /// or the best hardware adapter when `None`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(choice: Option<&str>) -> Result<GpuContext> {
        let instance = instance();
        let adapters = all_adapters(&instance);
        if adapters.is_empty() {
            bail!(INSTALL_HINT);
        }
        let adapter = match choice {
            None => adapters.iter().min_by_key(|a| rank(a.get_info().device_type)).unwrap(),
            Some(c) => {
                let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
                choose(&infos, c).map(|i| &adapters[i]).ok_or_else(|| {
                    let names: Vec<String> = adapters
                        .iter()
                        .enumerate()
                        .map(|(i, a)| format!("{i}: {} ({:?})", a.get_info().name, a.get_info().backend))
                        .collect();
                    anyhow!(
                        "no adapter matches --adapter {c:?} (an index, part of a name, or NAME:BACKEND with BACKEND \
                         one of vulkan, gl, metal, dx12); the adapters are: {}",
                        names.join(", ")
                    )
                })?
            }
        };
        pollster::block_on(GpuContext::open(adapter))
    }

    /// The browser's WebGPU adapter (high performance when it has a choice), opened.
    #[cfg(target_arch = "wasm32")]
    pub async fn browser() -> Result<GpuContext> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::BROWSER_WEBGPU;
        let instance = wgpu::Instance::new(desc);
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        };
        let adapter = instance.request_adapter(&options).await.map_err(|e| {
            anyhow!("this browser offers no WebGPU adapter ({e}); WebGPU needs a recent Chrome, Edge or Safari")
        })?;
        GpuContext::open(&adapter).await
    }

    /// Opens a device on `adapter` with its own limits and our optional features, and routes the
    /// errors wgpu reports outside any call's result into [`GpuContext::check`].
    pub async fn open(adapter: &wgpu::Adapter) -> Result<GpuContext> {
        let info = adapter.get_info();
        super::limits::check_limits(&info, &adapter.limits())?;
        // Timestamp queries time each kernel (`profile`); they are optional.
        let features = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let desc = wgpu::DeviceDescriptor {
            label: Some("mnist-wgpu"),
            required_features: features,
            // The adapter's own limits: wgpu's defaults allow too few storage buffers per stage.
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) = adapter
            .request_device(&desc)
            .await
            .with_context(|| format!("opening a device on adapter {} ({:?})", info.name, info.backend))?;
        log::info!("adapter: {} ({:?}, {:?})", info.name, info.backend, info.device_type);
        let faults = Faults::default();
        let errors = faults.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| errors.record(describe_error(&e))));
        let lost = faults.clone();
        device.set_device_lost_callback(move |reason, message| {
            let detail = if message.is_empty() { String::new() } else { format!(": {message}") };
            lost.record(format!("the device was lost ({reason:?}){detail}"))
        });
        Ok(GpuContext { device, queue, timestamps: !features.is_empty(), info, faults })
    }

    /// Ends the run with the first fault the GPU reported, if any (see `GpuFailure`).
    pub fn check(&self) -> Result<()> {
        match self.faults.first() {
            Some(what) => Err(GpuFailure(what).into()),
            None => Ok(()),
        }
    }

    /// For a map of our own buffer that failed: the fault the GPU reported, else `error` as a GPU
    /// failure. A destroyed device fails maps at once but reports its loss only from the next poll that
    /// finds its queue empty, so the device is polled first.
    pub fn fault_or(&self, error: anyhow::Error) -> anyhow::Error {
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        match self.check() {
            Err(fault) => fault,
            Ok(()) => GpuFailure(format!("{error:#}")).into(),
        }
    }

    /// True for a software adapter (lavapipe, WARP, SwiftShader): correct, but far too slow to train on.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// A storage buffer holding `data`, readable back and writable from the host.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        // wgpu rejects zero-sized bindings; keep at least one element.
        let bytes = bytemuck::cast_slice(data);
        let padded;
        let contents = if bytes.is_empty() {
            padded = [0u8; 4];
            &padded[..]
        } else {
            bytes
        };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// A zeroed storage buffer of `len` 4-byte elements.
    pub fn zeros(&self, label: &str, len: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (len.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A uniform buffer holding `value`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::bytes_of(value),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// Copies the first `len` elements of type T of `buffer` back to the host (waits for the GPU).
    pub async fn read<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<T>> {
        let size = (len * std::mem::size_of::<T>()) as u64;
        if size == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        let submission = self.queue.submit([encoder.finish()]);
        let mapped = MapFlag::new(MapFlag::WAITING);
        mapped.map(&staging, wgpu::MapMode::Read);
        self.wait_for(Some(submission), || mapped.get() != MapFlag::WAITING).await?;
        if mapped.get() != MapFlag::MAPPED {
            return Err(self.fault_or(anyhow!("mapping a readback buffer failed")));
        }
        let slice = staging.slice(..);
        let view = slice.get_mapped_range().context("reading a mapped buffer").map_err(|e| self.fault_or(e))?;
        let out = bytemuck::cast_slice(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Overwrites the start of `buffer` with `data`.
    pub fn write<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer, data: &[T]) {
        self.queue.write_buffer(buffer, 0, bytemuck::cast_slice(data));
    }

    /// Waits until all submitted work has finished.
    pub async fn wait(&self) -> Result<()> {
        let done = Arc::new(AtomicU8::new(0));
        let flag = done.clone();
        self.queue.on_submitted_work_done(move || flag.store(1, Ordering::Release));
        self.wait_for(None, || done.load(Ordering::Acquire) != 0).await
    }

    /// Waits until `ready` holds, which a callback of work submitted by `submission` (or of all work
    /// submitted, when None) sets: a map or a work-done callback. Natively the device is polled until
    /// that work has finished, which runs the callbacks; in a page, control goes back to the browser's
    /// event loop, which runs them, until `ready` holds. Ends with any fault the GPU reported.
    pub async fn wait_for(&self, submission: Option<wgpu::SubmissionIndex>, ready: impl Fn() -> bool) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        if !ready() {
            self.poll(wgpu::PollType::Wait { submission_index: submission, timeout: None })?;
            // Another thread polling the same device may have collected this work's callback and
            // not run it yet (wgpu runs callbacks on the thread that polled, after its locks): it
            // does so in a moment. Seen in the parity tests, which share one device.
            let deadline = std::time::Instant::now() + CALLBACK_GRACE;
            while !ready() && std::time::Instant::now() < deadline {
                std::thread::yield_now();
                self.poll(wgpu::PollType::Poll)?;
            }
        }
        #[cfg(target_arch = "wasm32")]
        {
            let _ = submission;
            while !ready() {
                self.check()?;
                next_tick().await;
            }
        }
        self.check()?;
        if !ready() {
            bail!("the GPU finished its work but a callback it owed never ran");
        }
        Ok(())
    }

    /// Polls the device, then ends the run with any fault the GPU reported meanwhile.
    pub fn poll(&self, how: wgpu::PollType) -> Result<()> {
        let polled = self.device.poll(how).context("waiting for the GPU");
        self.check()?;
        polled.map(|_| ()).map_err(|e| self.fault_or(e))
    }
}

/// How long a callback whose work has finished may take to run on another thread's poll.
#[cfg(not(target_arch = "wasm32"))]
const CALLBACK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The state of an asynchronous map, set by its callback.
#[derive(Clone)]
pub struct MapFlag(Arc<AtomicU8>);

impl MapFlag {
    pub const WAITING: u8 = 0;
    pub const MAPPED: u8 = 1;
    pub const FAILED: u8 = 2;

    pub fn new(state: u8) -> MapFlag {
        MapFlag(Arc::new(AtomicU8::new(state)))
    }

    pub fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    /// Maps `buffer` whole for `mode` once the GPU is done with it; the flag says when.
    pub fn map(&self, buffer: &wgpu::Buffer, mode: wgpu::MapMode) {
        self.0.store(Self::WAITING, Ordering::Release);
        let flag = self.0.clone();
        buffer.slice(..).map_async(mode, move |r| {
            flag.store(if r.is_ok() { Self::MAPPED } else { Self::FAILED }, Ordering::Release)
        });
    }
}

/// Yields to the browser's event loop for a moment (a zero-delay timer), so that WebGPU's promises, and
/// so wgpu's callbacks, can run. In a window or a worker alike.
#[cfg(target_arch = "wasm32")]
async fn next_tick() {
    use wasm_bindgen::JsCast;
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        let global = js_sys::global();
        let set_timeout = js_sys::Reflect::get(&global, &"setTimeout".into()).ok();
        match set_timeout.and_then(|f| f.dyn_into::<js_sys::Function>().ok()) {
            Some(f) => {
                let _ = f.call2(&global, &resolve, &0.into());
            }
            None => {
                let _ = resolve.call0(&global);
            }
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, backend: wgpu::Backend) -> wgpu::AdapterInfo {
        wgpu::AdapterInfo { name: name.into(), ..wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, backend) }
    }

    #[test]
    fn adapters_are_chosen_by_index_name_or_name_and_backend() {
        let list = [
            info("llvmpipe (LLVM 15.0.6, 256 bits)", wgpu::Backend::Vulkan),
            info("NVIDIA H100 80GB HBM3", wgpu::Backend::Vulkan),
            info("llvmpipe (LLVM 15.0.6, 256 bits)", wgpu::Backend::Gl),
        ];
        assert_eq!(choose(&list, "1"), Some(1));
        assert_eq!(choose(&list, "3"), None);
        assert_eq!(choose(&list, "llvmpipe"), Some(0));
        assert_eq!(choose(&list, "LLVMpipe:GL"), Some(2));
        assert_eq!(choose(&list, "llvmpipe:vulkan"), Some(0));
        assert_eq!(choose(&list, "h100"), Some(1));
        assert_eq!(choose(&list, "h100:gl"), None);
        assert_eq!(choose(&list, "llvmpipe:metal"), None);
        // A suffix that is no backend is part of the name.
        assert_eq!(choose(&list, "llvmpipe:x"), None);
    }
}
