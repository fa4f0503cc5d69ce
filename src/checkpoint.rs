//! Checkpoints in safetensors with PyTorch's state_dict names, so the spec's PyTorch network loads them
//! unchanged (`model.load_state_dict(safetensors.torch.load_file(path))`). What resuming needs beyond
//! the state_dict (the optimizer's state, named as PyTorch's: SGD's `momentum_buffer`s as
//! `momentum.<param>`; Adam's and AdamW's `exp_avg.<param>`, `exp_avg_sq.<param>` and `step`) goes in a
//! companion file, `NAME.optim.safetensors`, and the run's position (epoch, step, accuracy, seed,
//! recipe) in the metadata of both.
//! Files are written atomically: to a temporary name in the same folder, then renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::Model;
use crate::optim::{OptimizerKind, MOMENT_SLOTS};

/// The format of this file's metadata, checked on load.
const FORMAT: &str = "mnist-wgpu/1";

/// Where a run stands, stored in the checkpoint's metadata (all as strings).
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// Completed epochs, plus the batches done of the current one.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// Training steps done in all (the schedule's position).
    pub global_step: usize,
    /// Test accuracy (percent) of the last completed epoch, if any.
    pub test_accuracy: Option<f64>,
    pub seed: u64,
    /// The recipe the run follows, as JSON (epochs, batch size, max lr, ...).
    pub recipe: String,
}

impl Position {
    fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("epoch".into(), self.epoch.to_string());
        m.insert("batch_in_epoch".into(), self.batch_in_epoch.to_string());
        m.insert("global_step".into(), self.global_step.to_string());
        if let Some(a) = self.test_accuracy {
            m.insert("test_accuracy".into(), format!("{a:.2}"));
        }
        m.insert("seed".into(), self.seed.to_string());
        m.insert("recipe".into(), self.recipe.clone());
        m
    }

    fn from_map(path: &Path, m: &HashMap<String, String>) -> Result<Position> {
        let get = |k: &str| m.get(k).ok_or_else(|| anyhow!("{}: metadata has no {k:?}", path.display()));
        let num = |k: &str| -> Result<u64> {
            get(k)?.parse().map_err(|e| anyhow!("{}: metadata {k:?} is not a number ({e})", path.display()))
        };
        if get("format")? != FORMAT {
            bail!("{}: format {:?}, expected {FORMAT:?}", path.display(), get("format")?);
        }
        Ok(Position {
            epoch: num("epoch")? as usize,
            batch_in_epoch: num("batch_in_epoch")? as usize,
            global_step: num("global_step")? as usize,
            test_accuracy: m.get("test_accuracy").and_then(|v| v.parse().ok()),
            seed: num("seed")?,
            recipe: get("recipe")?.clone(),
        })
    }
}

/// `runs/x/last.safetensors` -> `runs/x/last.optim.safetensors`.
pub fn optim_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!("{stem}.optim.safetensors"))
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

type Tensors<'a> = Vec<(String, Vec<usize>, &'a [u8], Dtype)>;

/// Serializes named f32 tensors (and extra i64 scalars) with metadata; `path` only names the file in
/// errors.
fn serialize(path: &Path, tensors: Tensors, meta: HashMap<String, String>) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes, dtype)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .with_context(|| format!("{}: building tensors", path.display()))?;
    safetensors::tensor::serialize(views, Some(meta)).with_context(|| format!("{}: serializing", path.display()))
}

/// Writes `bytes` to `path` atomically.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    // On disk before the rename makes it the checkpoint, so that a crash of the machine cannot leave a
    // renamed but empty file.
    file.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// `runs/x/last.optim.safetensors` -> `runs/x/last.optim.prev.safetensors`: the companion of the
/// checkpoint being replaced, kept until the new pair is complete.
fn previous_optim_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{stem}.optim.prev.safetensors"))
}

/// The metadata of a checkpoint at `position`: the position and the network as a model file.
fn metadata(model: &Model, position: &Position) -> HashMap<String, String> {
    let mut meta = position.to_map();
    // The network itself, as a model file: eval and resume rebuild it from there.
    meta.insert(MODEL_KEY.into(), model.to_toml());
    meta
}

/// The state_dict file of `state` at `position`, as bytes (what `save` writes at `path`, and what the
/// web page offers for download); `path` only names the file in errors.
pub fn state_dict_bytes(path: &Path, model: &Model, state: &[f32], position: &Position) -> Result<Vec<u8>> {
    assert_eq!(state.len(), model.num_state);
    // PyTorch's BatchNorm2d also keeps the number of batches it has seen, an int64 scalar.
    let batches = (position.global_step as i64).to_le_bytes();
    let mut tensors: Tensors = model
        .params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone(), f32_bytes(&state[p.offset..p.offset + p.len]), Dtype::F32))
        .collect();
    for p in model.params.iter().filter(|p| p.name.ends_with(".running_mean")) {
        let module = p.name.trim_end_matches(".running_mean");
        tensors.push((format!("{module}.num_batches_tracked"), vec![], &batches[..], Dtype::I64));
    }
    serialize(path, tensors, metadata(model, position))
}

/// The optimizer's state of a run: its kind, and its moments over the trainable prefix (SGD's momenta,
/// or Adam's first then second moments: `MOMENT_SLOTS` x `num_trainable` values).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimState {
    pub kind: OptimizerKind,
    pub moments: Vec<f32>,
}

/// The metadata key of the optimizer in the companion file (absent: SGD, as before Adam existed).
const OPTIMIZER_KEY: &str = "optimizer";

/// The companion's tensors: per trainable tensor its moments, and Adam's step count.
fn optim_tensors<'a>(model: &'a Model, optim: &'a OptimState, step: &'a [u8]) -> Tensors<'a> {
    let n = model.num_trainable;
    let names: &[&str] = match optim.kind {
        OptimizerKind::Sgd => &["momentum"],
        OptimizerKind::Adam | OptimizerKind::AdamW => &["exp_avg", "exp_avg_sq"],
    };
    let mut tensors: Tensors = Vec::new();
    for (slot, prefix) in names.iter().enumerate() {
        for p in model.params.iter().filter(|p| p.trainable) {
            let values = &optim.moments[slot * n + p.offset..slot * n + p.offset + p.len];
            tensors.push((format!("{prefix}.{}", p.name), p.shape.clone(), f32_bytes(values), Dtype::F32));
        }
    }
    if optim.kind != OptimizerKind::Sgd {
        tensors.push(("step".into(), vec![], step, Dtype::I64));
    }
    tensors
}

/// Writes `path` (the state_dict) and its companion with the optimizer's state (for SGD, `moments`
/// may hold the momenta alone).
pub fn save(path: &Path, model: &Model, state: &[f32], optim: &OptimState, position: &Position) -> Result<()> {
    let n = model.num_trainable;
    let slots = if optim.kind == OptimizerKind::Sgd { 1 } else { MOMENT_SLOTS };
    assert!(optim.moments.len() == slots * n || optim.moments.len() == MOMENT_SLOTS * n, "moments length");
    let tensors = state_dict_bytes(path, model, state, position)?;
    let step = (position.global_step as i64).to_le_bytes();
    let mut meta = metadata(model, position);
    if optim.kind != OptimizerKind::Sgd {
        meta.insert(OPTIMIZER_KEY.into(), optim.kind.name().into());
    }
    let companion = optim_path(path);
    let optim = serialize(&companion, optim_tensors(model, optim, &step), meta)?;
    // A process killed at any instant leaves a pair that loads: the old companion is set aside first,
    // then the new one is written, then the state_dict; until the state_dict is replaced, the set-aside
    // companion still matches it, and `load` falls back to it.
    if companion.exists() {
        let previous = previous_optim_path(path);
        std::fs::rename(&companion, &previous)
            .with_context(|| format!("renaming {} to {}", companion.display(), previous.display()))?;
    }
    write_atomic(&companion, &optim)?;
    write_atomic(path, &tensors)
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub state: Vec<f32>,
    /// None when the companion file is absent (a checkpoint from elsewhere): evaluation works,
    /// resuming does not. Its moments are always `MOMENT_SLOTS` x `num_trainable` values.
    pub optim: Option<OptimState>,
    /// None for a plain state_dict without our metadata (e.g. one saved by PyTorch).
    pub position: Option<Position>,
}

fn read_f32(path: &Path, st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st.tensor(name).map_err(|_| anyhow!("{}: no tensor {name:?}", path.display()))?;
    if t.dtype() != Dtype::F32 {
        bail!("{}: tensor {name:?} is {:?}, expected F32", path.display(), t.dtype());
    }
    if t.shape() != shape {
        bail!("{}: tensor {name:?} has shape {:?}, expected {shape:?}", path.display(), t.shape());
    }
    Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn open(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))
}

/// The metadata key of the model file a checkpoint holds.
const MODEL_KEY: &str = "model";

/// The model file stored in checkpoint `path`, if it has one (checkpoints from before model files, and
/// state_dicts saved elsewhere, have none: they hold Net3).
pub fn stored_model(path: &Path) -> Result<Option<String>> {
    stored_model_in(path, &open(path)?)
}

/// The model file stored in a checkpoint's bytes; `path` only names the file in errors.
pub fn stored_model_in(path: &Path, bytes: &[u8]) -> Result<Option<String>> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    Ok(meta.metadata().as_ref().and_then(|m| m.get(MODEL_KEY).cloned()))
}

/// Loads `path` and, when present, its optimizer companion, checking every name, shape and type. When
/// a save was cut short (the companion is newer than the state_dict, or missing), the companion set
/// aside for the state_dict is used, with a warning.
pub fn load(path: &Path, model: &Model) -> Result<Checkpoint> {
    let Checkpoint { state, position, .. } = load_weights(path, model)?;
    let (optim, previous) = (optim_path(path), previous_optim_path(path));
    let optim_state = match read_optim(&optim, model)? {
        Some((m, pos)) if pos == position => Some(m),
        found => match read_optim(&previous, model)? {
            Some((m, pos)) if pos == position => {
                log::warn!(
                    "{}: its last save was cut short; using the optimizer state of {}, which matches it",
                    path.display(),
                    previous.display()
                );
                Some(m)
            }
            _ if found.is_some() => bail!(
                "{} belongs to another checkpoint than {} (their positions differ)",
                optim.display(),
                path.display()
            ),
            _ => None,
        },
    };
    Ok(Checkpoint { state, optim: optim_state, position })
}

/// The optimizer state and the position of an optimizer file, if it exists.
fn read_optim(optim: &Path, model: &Model) -> Result<Option<(OptimState, Option<Position>)>> {
    if !optim.exists() {
        return Ok(None);
    }
    optim_in(optim, &open(optim)?, model).map(Some)
}

/// The optimizer state and the position held in an optimizer file's bytes; `optim` only names the
/// file in errors. Adam's step count must be the position's global step.
pub fn optim_in(optim: &Path, bytes: &[u8], model: &Model) -> Result<(OptimState, Option<Position>)> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{}: not a safetensors file ({e})", optim.display()))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{}: {e}", optim.display()))?;
    let meta = meta.metadata().as_ref();
    let pos = meta.map(|m| Position::from_map(optim, m)).transpose()?;
    let kind = match meta.and_then(|m| m.get(OPTIMIZER_KEY)) {
        Some(name) => {
            OptimizerKind::parse(name).with_context(|| format!("{}: metadata {OPTIMIZER_KEY:?}", optim.display()))?
        }
        None => OptimizerKind::Sgd,
    };
    let n = model.num_trainable;
    let mut moments = vec![0.0f32; MOMENT_SLOTS * n];
    let names: &[&str] = if kind == OptimizerKind::Sgd { &["momentum"] } else { &["exp_avg", "exp_avg_sq"] };
    for (slot, prefix) in names.iter().enumerate() {
        for p in model.params.iter().filter(|p| p.trainable) {
            let values = read_f32(optim, &st, &format!("{prefix}.{}", p.name), &p.shape)?;
            moments[slot * n + p.offset..slot * n + p.offset + p.len].copy_from_slice(&values);
        }
    }
    if kind != OptimizerKind::Sgd {
        let step = read_step(optim, &st)?;
        if let Some(pos) = pos.as_ref().filter(|pos| pos.global_step as i64 != step) {
            bail!(
                "{}: Adam's step count {step} is not the checkpoint's global step {}",
                optim.display(),
                pos.global_step
            );
        }
    }
    Ok((OptimState { kind, moments }, pos))
}

/// Adam's step count: the int64 scalar `step`.
fn read_step(path: &Path, st: &SafeTensors) -> Result<i64> {
    let t = st.tensor("step").map_err(|_| anyhow!("{}: no tensor \"step\" (Adam's step count)", path.display()))?;
    if t.dtype() != Dtype::I64 || !t.shape().is_empty() {
        bail!(
            "{}: tensor \"step\" is {:?} of shape {:?}, expected an I64 scalar",
            path.display(),
            t.dtype(),
            t.shape()
        );
    }
    let bytes: [u8; 8] =
        t.data().try_into().map_err(|_| anyhow!("{}: tensor \"step\" is not 8 bytes", path.display()))?;
    Ok(i64::from_le_bytes(bytes))
}

/// The parameters, running statistics and position of a checkpoint, without its optimizer file (what
/// evaluation needs). Refuses one holding a NaN or an infinity, naming the tensor.
pub fn load_weights(path: &Path, model: &Model) -> Result<Checkpoint> {
    weights_in(path, &open(path)?, model)
}

/// What `load_weights` reads, from a checkpoint's bytes; `path` only names the file in errors.
pub fn weights_in(path: &Path, bytes: &[u8], model: &Model) -> Result<Checkpoint> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut state = vec![0.0f32; model.num_state];
    for p in &model.params {
        let values = read_f32(path, &st, &p.name, &p.shape)?;
        if values.iter().any(|v| !v.is_finite()) {
            bail!("{}: {} holds NaN or infinite values; it cannot be used", path.display(), p.name);
        }
        state[p.offset..p.offset + p.len].copy_from_slice(&values);
    }
    let position = match meta.metadata() {
        Some(m) if m.contains_key("format") => Some(Position::from_map(path, m)?),
        _ => None,
    };
    Ok(Checkpoint { state, optim: None, position })
}
