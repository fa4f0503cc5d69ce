//! mnist-wgpu in a web page: the library's GPU executor, training loop, verify and CPU reference,
//! compiled to WebAssembly and driven by `static/worker.js` (a dedicated worker, so that nothing here
//! runs on the page's main thread). Every export is async and awaits the GPU through the browser's
//! event loop; errors come back as sentences for the page to show.
//!
//! The page keeps one GPU device, the MNIST data it fetched, and one network: the documented run's
//! shipped with the page, the one just trained, or one loaded from a file. Draw and Download use it.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Result};
use mnist_wgpu::backend::Backend;
use mnist_wgpu::checkpoint::{self, OptimState, Position};
use mnist_wgpu::data::{self, Mnist, Split, IMAGE_PIXELS, IMAGE_SIDE};
use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::GpuContext;
use mnist_wgpu::model::Model;
use mnist_wgpu::optim::MOMENT_SLOTS;
use mnist_wgpu::train::{self, EpochRecord, Kept, Progress, Recipe, RunOptions, Sink};
use mnist_wgpu::verify;
use serde_json::json;
use wasm_bindgen::prelude::*;

/// The network the page holds.
struct Network {
    model: Model,
    state: Vec<f32>,
    position: Option<Position>,
    /// Where it came from, in words.
    origin: String,
}

#[derive(Default)]
struct Page {
    ctx: Option<GpuContext>,
    data: Option<Mnist>,
    network: Option<Network>,
    /// Counts the networks the page has held, so that `predictor` knows when it is stale.
    generation: u64,
    /// The network on the GPU at batch 1 for Draw (compiled once: a drawing is predicted per stroke),
    /// and the generation it holds.
    predictor: Option<(GpuBackend, u64)>,
}

impl Page {
    fn set_network(&mut self, network: Network) {
        if self.network.as_ref().is_some_and(|n| n.model.layers != network.model.layers) {
            self.predictor = None;
        }
        self.network = Some(network);
        self.generation += 1;
    }
}

thread_local! {
    static PAGE: RefCell<Page> = RefCell::new(Page::default());
}

/// Set by `stop`: the training run under way stops after its chunk of steps.
static STOP: AtomicBool = AtomicBool::new(false);

/// An error as the page shows it: the whole chain of causes in one sentence.
fn to_js(e: anyhow::Error) -> JsValue {
    JsValue::from_str(&format!("{e:#}"))
}

fn to_value(v: serde_json::Value) -> JsValue {
    JsValue::from_str(&v.to_string())
}

/// The open device (opened by `open_gpu`).
fn ctx() -> Result<GpuContext> {
    PAGE.with(|p| p.borrow().ctx.clone()).ok_or_else(|| anyhow!("the GPU is not open yet"))
}

/// Opens the browser's WebGPU device with the adapter's own limits; fails with a sentence when the
/// browser has no WebGPU or the adapter lacks what the kernels need.
#[wasm_bindgen]
pub async fn open_gpu() -> Result<(), JsValue> {
    console_panics();
    let ctx = GpuContext::browser().await.map_err(to_js)?;
    PAGE.with(|p| p.borrow_mut().ctx = Some(ctx));
    Ok(())
}

/// A panic (a bug) reaches the page's error line through `reportPanic` of `worker.js`.
fn console_panics() {
    std::panic::set_hook(Box::new(|info| {
        web_error(&format!("the page's WebAssembly panicked (a bug): {info}"));
    }));
}

#[wasm_bindgen]
extern "C" {
    /// `worker.js` posts it to the page as an error.
    #[wasm_bindgen(js_name = reportPanic)]
    fn web_error(message: &str);
}

/// Decodes the four MNIST files (gzipped IDX, as fetched from the page's folder).
#[wasm_bindgen]
pub fn set_data(
    train_images: &[u8],
    train_labels: &[u8],
    test_images: &[u8],
    test_labels: &[u8],
) -> Result<JsValue, JsValue> {
    let split = |images: &[u8], labels: &[u8], i: &str, l: &str| {
        data::split_from_bytes(Path::new(i), images, Path::new(l), labels).map_err(|e| anyhow!("{e}"))
    };
    let set = Mnist {
        train: split(train_images, train_labels, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
            .map_err(to_js)?,
        test: split(test_images, test_labels, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
            .map_err(to_js)?,
    };
    let counts = json!({"train": set.train.len(), "test": set.test.len()});
    PAGE.with(|p| p.borrow_mut().data = Some(set));
    Ok(to_value(counts))
}

/// The first `train` and `test` images of the fetched data (0: all of them).
fn subset(train: usize, test: usize) -> Result<Mnist> {
    let take = |s: &Split, n: usize| if n == 0 { s.clone() } else { s.first(n) };
    PAGE.with(|p| {
        let page = p.borrow();
        let set = page.data.as_ref().ok_or_else(|| anyhow!("the MNIST data has not been fetched yet"))?;
        Ok(Mnist { train: take(&set.train, train), test: take(&set.test, test) })
    })
}

fn check_rows(checks: &[verify::Check]) -> serde_json::Value {
    json!(checks.iter().map(|c| c.to_json()).collect::<Vec<_>>())
}

/// `verify`'s checks, in the page: every kernel of Net3 at batch `batch`, then whole training steps,
/// against the CPU reference running here.
#[wasm_bindgen]
pub async fn verify(batch: usize, model: String) -> Result<JsValue, JsValue> {
    run_verify(batch, &model).await.map(to_value).map_err(to_js)
}

/// `verify` of preset `model` (any network of `models/`) at batch `n`.
async fn run_verify(n: usize, model: &str) -> Result<serde_json::Value> {
    if n == 0 {
        bail!("the batch size must be at least 1");
    }
    let model = mnist_wgpu::model::file::for_mnist(Some(model))?;
    let ctx = ctx()?;
    mnist_wgpu::gpu::net::check_batch_fits(&ctx, &model, n)?;
    let mut backend = GpuBackend::new(ctx, &model, &model.init_state(1))?;
    let (ctx, kernels) = backend.parts();
    let mut checks = verify::kernel_checks(ctx, kernels, &model, n).await?;
    let steps = verify::step_checks(&model, &mut backend, n, verify::DROPOUT_STEPS).await?;
    checks.extend(steps.checks.iter().cloned());
    Ok(summary(&checks, json!({ "set_aside": steps.set_aside_line() })))
}

/// The counts and the worst ratio beside the rows; `extra`'s fields added.
fn summary(checks: &[verify::Check], mut extra: serde_json::Value) -> serde_json::Value {
    let failed = checks.iter().filter(|c| !c.ok()).count();
    extra["checks"] = json!(checks.len());
    extra["failed"] = json!(failed);
    extra["worst_ratio"] = json!(verify::worst_ratio(checks));
    extra["rows"] = check_rows(checks);
    extra
}

/// `n` training steps of Net3 on the GPU against the CPU reference, each from the same state, with
/// verify's whole-step check (one step without dropout, then `n - 1` with it).
#[wasm_bindgen]
pub async fn steps(n: usize, batch: usize) -> Result<JsValue, JsValue> {
    run_steps(n, batch).await.map(to_value).map_err(to_js)
}

async fn run_steps(n: usize, batch: usize) -> Result<serde_json::Value> {
    if n == 0 || batch == 0 {
        bail!("the steps and the batch size must be at least 1");
    }
    let model = mnist_wgpu::model::file::for_mnist(None)?;
    let mut backend = GpuBackend::new(ctx()?, &model, &model.init_state(1))?;
    backend.check_batch(batch).await?;
    let started = web_time::Instant::now();
    let steps = verify::step_checks(&model, &mut backend, batch, n - 1).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(summary(
        &steps.checks,
        json!({
            "steps": n, "batches": steps.batches, "seconds": seconds,
            "set_aside": steps.set_aside_line(),
        }),
    ))
}

/// Reports a training run to the page through `report` and keeps its last network in memory.
struct PageSink {
    report: js_sys::Function,
    last: Option<(Vec<f32>, Position)>,
}

impl PageSink {
    fn send(&self, message: serde_json::Value) {
        let _ = self.report.call1(&JsValue::NULL, &to_value(message));
    }
}

impl Sink for PageSink {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, first_batch: usize, batches: usize) {
        self.send(json!({"type": "epoch_started", "epoch": epoch + 1, "epochs": epochs, "done": first_batch,
                         "batches": batches}));
    }

    fn progress(&mut self, p: &Progress) {
        self.send(json!({"type": "progress", "epoch": p.epoch + 1, "done": p.done, "batches": p.batches,
                         "loss": p.loss, "accuracy": p.accuracy, "images_per_sec": p.images_per_sec}));
    }

    fn keep(&mut self, which: Kept, _: &Model, state: &[f32], _: &OptimState, position: &Position) -> Result<()> {
        if which == Kept::Last {
            self.last = Some((state.to_vec(), position.clone()));
        }
        Ok(())
    }

    fn epoch_finished(&mut self, record: &EpochRecord) -> Result<()> {
        let mut message: serde_json::Value = serde_json::from_str(&record.to_json())?;
        message["type"] = json!("epoch");
        self.send(message);
        Ok(())
    }

    fn stopped(&mut self, position: &Position) {
        self.send(json!({"type": "stopped", "epoch": position.epoch + 1, "batch": position.batch_in_epoch}));
    }

    fn last_kept(&self) -> String {
        match &self.last {
            Some((_, p)) => format!("the network as of step {} is kept", p.global_step),
            None => "no network had been kept yet".into(),
        }
    }
}

/// What the page's Train asks for: the first `images` training images (0: all), evaluated on the
/// first `test_images` after each epoch.
#[derive(serde::Deserialize)]
struct TrainParams {
    images: usize,
    test_images: usize,
    epochs: usize,
    batch: usize,
    seed: u64,
    /// A preset: any model file of `models/` by its name (Net3 when absent).
    #[serde(default)]
    model: Option<String>,
}

/// Trains a preset network (Net3 by default) on the GPU with the recipe as `params` (TrainParams as
/// JSON) and the network's model file say; `report` gets each
/// progress and epoch message. The trained network becomes the page's.
#[wasm_bindgen]
pub async fn train(params: String, report: js_sys::Function) -> Result<JsValue, JsValue> {
    let params = serde_json::from_str(&params).map_err(|e| to_js(anyhow!("the training parameters: {e}")))?;
    run_train(params, report).await.map(to_value).map_err(to_js)
}

async fn run_train(p: TrainParams, report: js_sys::Function) -> Result<serde_json::Value> {
    let TrainParams { images, test_images, epochs, batch, seed, model } = p;
    let set = subset(images, test_images)?;
    if epochs == 0 || batch == 0 || batch > set.train.len() {
        bail!("epochs must be at least 1 and the batch size from 1 to the {} training images", set.train.len());
    }
    let name = model.unwrap_or_else(|| "net3".into());
    let model = mnist_wgpu::model::file::for_mnist(Some(&name))?;
    // The model file's [train] table (augmentation, max lr) as native `train` reads it; the page's
    // fields say the rest.
    let recipe = Recipe { epochs, batch_size: batch, seed, ..Recipe::for_model(&model) };
    let mut backend = GpuBackend::new(ctx()?, &model, &model.init_state(seed))?;
    backend.check_batch(batch).await?;
    let opts = RunOptions { recipe, start: (0, 0, 0), best_accuracy: None, chunk_batches: None, loader_threads: 0 };
    let mut sink = PageSink { report, last: None };
    STOP.store(false, Ordering::SeqCst);
    let outcome = train::run(&mut backend, &model, &set, &opts, &STOP, &mut sink).await?;
    let Some((state, position)) = sink.last else { bail!("the run kept no network") };
    let steps = position.global_step;
    let done = outcome.epochs.len();
    let origin = format!("trained here: {name}, {done} epoch(s) on {} images, seed {seed}", set.train.len());
    PAGE.with(|p| p.borrow_mut().set_network(Network { model, state, position: Some(position), origin }));
    let last = outcome.epochs.last();
    let seconds: f64 = outcome.epochs.iter().map(|e| (set.train.len() as f64) / e.train_images_per_sec).sum();
    Ok(json!({
        "steps": steps,
        "epochs": outcome.epochs.len(),
        "stopped": outcome.interrupted,
        "final_loss": last.map(|e| e.train_loss),
        "test_accuracy": last.map(|e| e.test_accuracy),
        "test_images": set.test.len(),
        "images_per_s": (outcome.epochs.len() * set.train.len()) as f64 / seconds.max(1e-9),
        "records": outcome.epochs.iter().map(|e| serde_json::from_str::<serde_json::Value>(&e.to_json()).ok())
            .collect::<Vec<_>>(),
    }))
}

/// The networks Train offers: every model file of `models/`, by name, Net3's first.
#[wasm_bindgen]
pub fn models() -> String {
    json!(mnist_wgpu::model::file::PRESETS.iter().map(|(name, _)| name).collect::<Vec<_>>()).to_string()
}

/// Stops the training run under way after its chunk of steps.
#[wasm_bindgen]
pub fn stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes the network of a checkpoint file's bytes the page's (`name` names the file in errors).
#[wasm_bindgen]
pub fn load_checkpoint(bytes: &[u8], name: &str, origin: &str) -> Result<JsValue, JsValue> {
    let path = Path::new(name);
    let loaded = (|| -> Result<Network> {
        let input = mnist_wgpu::model::Shape { c: 1, h: IMAGE_SIDE, w: IMAGE_SIDE };
        let model = match checkpoint::stored_model_in(path, bytes)? {
            Some(text) => mnist_wgpu::model::file::parse(&text, &format!("{name} (its model)"), input, 10)?,
            None => mnist_wgpu::model::file::for_mnist(None)?,
        };
        let ck = checkpoint::weights_in(path, bytes, &model)?;
        Ok(Network { model, state: ck.state, position: ck.position, origin: origin.to_string() })
    })()
    .map_err(to_js)?;
    let info = network_info(&loaded);
    PAGE.with(|p| p.borrow_mut().set_network(loaded));
    Ok(to_value(info))
}

fn network_info(n: &Network) -> serde_json::Value {
    json!({
        "origin": n.origin, "parameters": n.model.num_trainable,
        "test_accuracy": n.position.as_ref().and_then(|p| p.test_accuracy),
    })
}

/// The page's network and where it came from.
fn network() -> Result<(Model, Vec<f32>, Option<Position>)> {
    PAGE.with(|p| {
        let page = p.borrow();
        let n = page.network.as_ref().ok_or_else(|| anyhow!("the page holds no network yet"))?;
        Ok((n.model.clone(), n.state.clone(), n.position.clone()))
    })
}

/// The page's network as a `.safetensors` file (native `eval` and PyTorch load it).
#[wasm_bindgen]
pub fn checkpoint_bytes() -> Result<Vec<u8>, JsValue> {
    let (model, state, position) = network().map_err(to_js)?;
    // A network without a position (a PyTorch state_dict loaded here) is written as at step 0.
    let position = position.unwrap_or(Position {
        epoch: 0,
        batch_in_epoch: 0,
        global_step: 0,
        test_accuracy: None,
        seed: 1,
        recipe: Recipe::default().to_json(),
    });
    checkpoint::state_dict_bytes(Path::new("network.safetensors"), &model, &state, &position).map_err(to_js)
}

/// Test loss and accuracy of the page's network on the first `test_images` test images (0: all), on
/// the GPU in evaluation mode.
#[wasm_bindgen]
pub async fn evaluate(test_images: usize, batch: usize) -> Result<JsValue, JsValue> {
    run_evaluate(test_images, batch).await.map(to_value).map_err(to_js)
}

async fn run_evaluate(test_images: usize, batch: usize) -> Result<serde_json::Value> {
    // One training image: evaluation needs none, and copying all of them would cost 47 MB.
    let set = subset(1, test_images)?;
    let (model, state, _) = network()?;
    let batch = batch.clamp(1, set.test.len().max(1));
    let mut backend = GpuBackend::new(ctx()?, &model, &state)?;
    backend.check_batch(batch).await?;
    let (loss, correct) = train::evaluate(&mut backend, &set.test, batch).await?;
    Ok(json!({
        "test_images": set.test.len(), "correct": correct, "test_loss": loss,
        "test_accuracy": 100.0 * correct as f64 / set.test.len() as f64,
    }))
}

/// Classifies a picture (RGBA pixels, `width` x `height`, as a canvas gives them) with the page's
/// network on the GPU, after `predict`'s preprocessing: the three likeliest classes and the 28x28
/// picture the network saw.
#[wasm_bindgen]
pub async fn predict_rgba(rgba: Vec<u8>, width: u32, height: u32) -> Result<JsValue, JsValue> {
    let picture = image::RgbaImage::from_raw(width, height, rgba)
        .ok_or_else(|| JsValue::from_str("the drawing's pixels do not match its size"))?;
    predict(image::DynamicImage::ImageRgba8(picture)).await.map(to_value).map_err(to_js)
}

/// Classifies a PNG or JPEG file's bytes as `predict_rgba` does a drawing.
#[wasm_bindgen]
pub async fn predict_file(bytes: Vec<u8>, name: String) -> Result<JsValue, JsValue> {
    let picture = data::preprocess::decode(&bytes).map_err(|e| JsValue::from_str(&format!("{name}: {e}")))?;
    predict(picture).await.map(to_value).map_err(to_js)
}

async fn predict(picture: image::DynamicImage) -> Result<serde_json::Value> {
    let pixels = data::preprocess::preprocess(&picture).map_err(|e| anyhow!("{e}"))?;
    let mut input = vec![0.0f32; IMAGE_PIXELS];
    data::normalize_into(&pixels, &mut input);
    let (model, state, _) = network()?;
    let (held, generation) = PAGE.with(|p| {
        let mut page = p.borrow_mut();
        (page.predictor.take(), page.generation)
    });
    let mut backend = match held {
        Some((backend, g)) if g == generation => backend,
        Some((mut backend, _)) => {
            backend.load(&state, &vec![0.0; MOMENT_SLOTS * model.num_trainable]).await?;
            backend
        }
        None => GpuBackend::new(ctx()?, &model, &state)?,
    };
    let logits = backend.eval_logits(&input, &[0]).await;
    PAGE.with(|p| p.borrow_mut().predictor = Some((backend, generation)));
    let p = mnist_wgpu::cpu::reference::loss::softmax(&logits?);
    let mut ranked: Vec<usize> = (0..p.len()).collect();
    ranked.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let top: Vec<_> = ranked.iter().take(3).map(|&c| json!({"class": c, "p": p[c]})).collect();
    Ok(json!({ "top": top, "pixels": pixels }))
}
