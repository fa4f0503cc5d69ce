//! The network described once as data: the layer list (`layer.rs`, each layer type's model side),
//! every activation's shape (`shape.rs`), and the parameter table that carves one flat f32 buffer;
//! read from model files (`file.rs`) and lowered once into what the executors run (`plan.rs`). Every
//! backend executes this description. Knows nothing of wgpu.

pub mod file;
pub mod layer;
pub mod plan;
pub mod shape;

pub use self::layer::Layer;
pub use self::shape::{ConvDims, ParamKind, Shape};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::Deserialize;

use self::layer::ParamSpec;
use crate::optim::{weight_decay_fault, Optimizer, OptimizerKind, ADAM_BETAS, ADAM_EPS};

/// MNIST's images (one 28x28 channel) and classes, which every network of the program takes and gives.
pub const MNIST_INPUT: Shape = Shape { c: 1, h: 28, w: 28 };
pub const MNIST_CLASSES: usize = 10;

pub const BN_EPS: f32 = 1e-5;
/// The most parameters (trainable and running statistics) a network may have: 1 GiB of f32.
pub const MAX_PARAMS: usize = 1 << 28;
pub const BN_MOMENTUM: f32 = 0.1;

/// Dropout keeps an element when its 24-bit hash draw is at least this (p * 2^24); shared by every
/// backend so that all draw the same masks.
pub fn dropout_threshold(p: f32) -> u32 {
    (p as f64 * (1u32 << 24) as f64) as u32
}

/// Where a parameter tensor lives in the flat state buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// PyTorch state_dict name, e.g. `conv1.weight`, `bn1.running_var`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Trained by SGD (weights, batchnorm affine) rather than a running statistic.
    pub trainable: bool,
    /// What the tensor is, which decides its initialization.
    pub kind: ParamKind,
}

/// A model file's `[train]` table: what `train` uses where no flag is given (unset: the recipe's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainDefaults {
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_lr: Option<f64>,
    /// The one-cycle schedule's shape, as PyTorch's `OneCycleLR` names it.
    pub pct_start: Option<f64>,
    pub div_factor: Option<f64>,
    pub final_div_factor: Option<f64>,
    /// The optimizer (`sgd`, `adam` or `adamw`), Adam's betas and eps, and the weight decay.
    pub optimizer: Option<OptimizerKind>,
    pub betas: Option<[f64; 2]>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f32>,
    /// The per-image augmentation's strengths: the crop's shift (pixels), the brightness and contrast
    /// jitter, the rotation (degrees) and the cutout probability.
    pub translate: Option<usize>,
    pub jitter: Option<f32>,
    pub rotate: Option<f32>,
    pub cutout: Option<f64>,
    #[serde(default)]
    pub swell: bool,
    #[serde(default)]
    pub darken: bool,
    #[serde(default)]
    pub squeeze: bool,
}

impl TrainDefaults {
    /// What is wrong with these settings, if anything.
    pub(crate) fn fault(&self) -> Option<String> {
        let fault = if self.epochs == Some(0) {
            "`epochs` must be at least 1"
        } else if self.batch_size == Some(0) {
            "`batch_size` must be at least 1"
        } else if self.max_lr.is_some_and(|lr| !(lr.is_finite() && lr > 0.0)) {
            "`max_lr` must be a positive number"
        } else if self.pct_start.is_some_and(|p| !(p > 0.0 && p < 1.0)) {
            "`pct_start` must be between 0 and 1"
        } else if [self.div_factor, self.final_div_factor].iter().flatten().any(|d| !(d.is_finite() && *d >= 1.0)) {
            "`div_factor` and `final_div_factor` must be numbers of at least 1"
        } else {
            // The optimizer's settings, checked as the command line's are.
            let optimizer = Optimizer {
                kind: self.optimizer.unwrap_or_default(),
                betas: self.betas.map_or(ADAM_BETAS, |[b1, b2]| (b1, b2)),
                eps: self.eps.unwrap_or(ADAM_EPS),
            };
            return optimizer.fault().or_else(|| self.weight_decay.and_then(weight_decay_fault));
        };
        Some(fault.to_string())
    }
}

/// A layer that does not fit the shape it receives: its index in the layer list and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerError {
    pub index: usize,
    pub message: String,
}

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {}: {}", self.index + 1, self.message)
    }
}

impl std::error::Error for LayerError {}

/// Indices into the parameter table of one layer's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerParams {
    None,
    /// A convolution or linear layer: its weight and its bias, if any.
    Conv {
        weight: usize,
        bias: Option<usize>,
    },
    BatchNorm {
        weight: usize,
        bias: usize,
        running_mean: usize,
        running_var: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Model {
    pub input: Shape,
    pub layers: Vec<Layer>,
    /// Output shape of each layer.
    pub shapes: Vec<Shape>,
    pub layer_params: Vec<LayerParams>,
    /// The flat state buffer's table: trainable tensors first (in state_dict order), then running statistics.
    pub params: Vec<ParamEntry>,
    /// Length of the trainable prefix of the state buffer (what SGD updates and gradients cover).
    pub num_trainable: usize,
    /// Length of the whole state buffer (trainable prefix + running statistics).
    pub num_state: usize,
    /// The training settings the model file recommends (its `[train]` table); flags override them.
    pub train: TrainDefaults,
}

impl Model {
    /// The recipe's network: 17,900 trainable parameters.
    pub fn net3() -> Model {
        use Layer::*;
        let layers = vec![
            Conv { name: "conv1".into(), cin: 1, cout: 8, k: 3, pad: 1, bias: false },
            BatchNorm { name: "bn1".into(), c: 8 },
            Relu,
            Conv { name: "conv2".into(), cin: 8, cout: 16, k: 3, pad: 1, bias: false },
            BatchNorm { name: "bn2".into(), c: 16 },
            Relu,
            Dropout { p: 0.05 },
            MaxPool2,
            Conv { name: "conv3".into(), cin: 16, cout: 16, k: 3, pad: 1, bias: false },
            BatchNorm { name: "bn3".into(), c: 16 },
            Relu,
            Conv { name: "conv4".into(), cin: 16, cout: 32, k: 3, pad: 1, bias: false },
            BatchNorm { name: "bn4".into(), c: 32 },
            Relu,
            MaxPool2,
            Conv { name: "conv5".into(), cin: 32, cout: 32, k: 3, pad: 0, bias: false },
            BatchNorm { name: "bn5".into(), c: 32 },
            Relu,
            Conv { name: "conv6".into(), cin: 32, cout: 10, k: 1, pad: 0, bias: false },
            BatchNorm { name: "bn6".into(), c: 10 },
            Relu,
            GlobalAvgPool,
        ];
        Model::new(MNIST_INPUT, layers)
    }

    /// Builds the shapes and the parameter table of a layer list; panics on a list that does not fit
    /// together, which is a programming error in a description written in code (a model file goes
    /// through `build` and gets an error naming the layer).
    pub fn new(input: Shape, layers: Vec<Layer>) -> Model {
        Model::build(input, layers).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Builds the shapes and the parameter table of a layer list, or says which layer does not fit
    /// the shape it receives and why.
    pub fn build(input: Shape, layers: Vec<Layer>) -> Result<Model, LayerError> {
        let mut shapes = Vec::with_capacity(layers.len());
        let mut shape = input;
        let mut trainable: Vec<ParamSpec> = Vec::new();
        let mut running: Vec<ParamSpec> = Vec::new();
        // Per layer: the indices of its tensors within `trainable` / `running`, fixed up below.
        let mut slots: Vec<LayerParams> = Vec::with_capacity(layers.len());
        for (index, layer) in layers.iter().enumerate() {
            let fail = |message: String| LayerError { index, message };
            shape = layer.output_shape(shape).map_err(fail)?;
            let (t, r) = layer.params();
            // Where its tensors land in the two lists, by kind.
            let at = |list: &[ParamSpec], start: usize, kind: fn(&ParamKind) -> bool| {
                list.iter().position(|p| kind(&p.2)).map(|i| start + i)
            };
            let (ts, rs) = (trainable.len(), running.len());
            let slot = match layer {
                Layer::Conv { .. } | Layer::Linear { .. } => {
                    LayerParams::Conv { weight: ts, bias: at(&t, ts, |k| matches!(k, ParamKind::ConvBias { .. })) }
                }
                Layer::BatchNorm { .. } => {
                    LayerParams::BatchNorm { weight: ts, bias: ts + 1, running_mean: rs, running_var: rs + 1 }
                }
                _ => LayerParams::None,
            };
            trainable.extend(t);
            running.extend(r);
            // Refused here rather than by an allocation that aborts the process.
            let values = trainable.iter().chain(&running).try_fold(0usize, |sum, (_, dims, _)| {
                dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).and_then(|n| sum.checked_add(n))
            });
            if values.is_none_or(|v| v > MAX_PARAMS) {
                return Err(fail(format!(
                    "the network reaches more than {} parameters here, beyond what this program trains",
                    group_thousands(MAX_PARAMS)
                )));
            }
            shapes.push(shape);
            slots.push(slot);
        }
        let num_trainable_tensors = trainable.len();
        let mut params = Vec::new();
        let mut offset = 0;
        for ((name, shape, kind), is_trainable) in
            trainable.into_iter().map(|t| (t, true)).chain(running.into_iter().map(|t| (t, false)))
        {
            let len = shape.iter().product();
            params.push(ParamEntry { name, shape, offset, len, trainable: is_trainable, kind });
            offset += len;
        }
        let num_trainable = params.iter().filter(|p| p.trainable).map(|p| p.len).sum();
        let layer_params = slots
            .into_iter()
            .map(|s| match s {
                LayerParams::BatchNorm { weight, bias, running_mean, running_var } => LayerParams::BatchNorm {
                    weight,
                    bias,
                    running_mean: running_mean + num_trainable_tensors,
                    running_var: running_var + num_trainable_tensors,
                },
                other => other,
            })
            .collect();
        Ok(Model {
            input,
            layers,
            shapes,
            layer_params,
            params,
            num_trainable,
            num_state: offset,
            train: TrainDefaults::default(),
        })
    }

    pub fn output_classes(&self) -> usize {
        self.shapes.last().map_or(0, |s| s.len())
    }

    /// The table entry of a state_dict name.
    pub fn param(&self, name: &str) -> Option<&ParamEntry> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The offset of layer `i`'s bias, if it is a convolution or linear layer with one.
    pub fn conv_bias(&self, i: usize) -> Option<usize> {
        match self.layer_params[i] {
            LayerParams::Conv { bias, .. } => bias.map(|b| self.params[b].offset),
            _ => None,
        }
    }

    /// Layer `i`'s convolution over a batch of `n`, with its weights' offset, if it is one; a linear
    /// layer is the 1x1 convolution of its flattened input (an fin x 1 x 1 image).
    pub fn conv(&self, i: usize, n: usize) -> Option<(ConvDims, usize)> {
        match (&self.layers[i], self.layer_params[i]) {
            (&Layer::Conv { cin, cout, k, pad, .. }, LayerParams::Conv { weight, .. }) => {
                let s = self.input_of(i);
                Some((ConvDims { n, cin, h: s.h, w: s.w, cout, k, pad }, self.params[weight].offset))
            }
            (&Layer::Linear { fin, fout, .. }, LayerParams::Conv { weight, .. }) => {
                Some((ConvDims { n, cin: fin, h: 1, w: 1, cout: fout, k: 1, pad: 0 }, self.params[weight].offset))
            }
            _ => None,
        }
    }

    /// A short name for layer `i`: its module name (`conv2`, `bn2`), else its kind and index.
    pub fn layer_name(&self, i: usize) -> String {
        self.layers[i].name(i)
    }

    /// The input shape of layer `i`.
    pub fn input_of(&self, i: usize) -> Shape {
        if i == 0 {
            self.input
        } else {
            self.shapes[i - 1]
        }
    }

    /// PyTorch's default initialization, drawn from `seed`: conv weights uniform in
    /// [-1/sqrt(fan_in), 1/sqrt(fan_in)], batchnorm weight 1, bias 0, running mean 0, running var 1.
    pub fn init_state(&self, seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut state = vec![0.0f32; self.num_state];
        // By kind, in table order (the draws' order).
        for p in &self.params {
            let slice = &mut state[p.offset..p.offset + p.len];
            match p.kind {
                ParamKind::BatchNormWeight | ParamKind::RunningVar => slice.fill(1.0),
                ParamKind::BatchNormBias | ParamKind::RunningMean => {}
                ParamKind::ConvWeight { fan_in } | ParamKind::ConvBias { fan_in } => {
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    slice.iter_mut().for_each(|v| *v = rng.random_range(-bound..bound));
                }
            }
        }
        state
    }

    /// A per-layer table in the style of torchsummary, ending in the parameter totals.
    pub fn summary(&self) -> String {
        let mut rows = vec![("Layer (type)".to_string(), "Output Shape".to_string(), "Param #".to_string())];
        let input = self.input;
        rows.push(("input".into(), format!("[-1, {}, {}, {}]", input.c, input.h, input.w), "0".into()));
        for (i, layer) in self.layers.iter().enumerate() {
            let s = self.shapes[i];
            let label = layer.summary_label();
            let count: usize = match self.layer_params[i] {
                LayerParams::None => 0,
                LayerParams::Conv { weight, bias } => self.params[weight].len + bias.map_or(0, |b| self.params[b].len),
                LayerParams::BatchNorm { weight, bias, .. } => self.params[weight].len + self.params[bias].len,
            };
            let shape = if matches!(layer, Layer::GlobalAvgPool) {
                format!("[-1, {}]", s.c)
            } else {
                format!("[-1, {}, {}, {}]", s.c, s.h, s.w)
            };
            rows.push((label, shape, group_thousands(count)));
        }
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0) + 2;
        let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0) + 2;
        let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(0);
        let rule = "-".repeat(w0 + w1 + w2);
        let mut out = String::new();
        for (i, (a, b, c)) in rows.iter().enumerate() {
            out += &format!("{a:<w0$}{b:<w1$}{c:>w2$}\n");
            if i == 0 {
                out += &format!("{}\n", "=".repeat(w0 + w1 + w2));
            }
        }
        out += &format!("{rule}\n");
        out += &format!("Total params: {}\n", group_thousands(self.num_trainable));
        out += &format!("Trainable params: {}\n", group_thousands(self.num_trainable));
        out += &format!(
            "Non-trainable buffers: {} (batchnorm running mean and variance)\n",
            group_thousands(self.num_state - self.num_trainable)
        );
        out
    }
}

/// 17900 -> "17,900".
pub fn group_thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net3_matches_the_spec_table() {
        let m = Model::net3();
        assert_eq!(m.num_trainable, 17_900);
        let per_layer: Vec<(&str, usize)> = m.params.iter().map(|p| (p.name.as_str(), p.len)).collect();
        assert_eq!(&per_layer[..3], &[("conv1.weight", 72), ("bn1.weight", 8), ("bn1.bias", 8)]);
        assert_eq!(m.param("conv5.weight").unwrap().len, 9_216);
        assert_eq!(m.param("conv6.weight").unwrap().shape, vec![10, 32, 1, 1]);
        assert_eq!(m.param("bn6.running_var").unwrap().len, 10);
        assert_eq!(m.shapes.last(), Some(&Shape { c: 10, h: 1, w: 1 }));
        assert_eq!(m.shapes[14], Shape { c: 32, h: 7, w: 7 });
        assert_eq!(m.shapes[15], Shape { c: 32, h: 5, w: 5 });
        // Offsets tile the buffer with no gap or overlap.
        let mut end = 0;
        for p in &m.params {
            assert_eq!(p.offset, end, "{}", p.name);
            end += p.len;
        }
        assert_eq!(end, m.num_state);
        assert!(m.summary().contains("Total params: 17,900"));
    }

    #[test]
    fn init_follows_pytorch_defaults() {
        let m = Model::net3();
        let s = m.init_state(7);
        for p in &m.params {
            let v = &s[p.offset..p.offset + p.len];
            if p.shape.len() == 4 {
                let bound = 1.0 / ((p.shape[1] * p.shape[2] * p.shape[3]) as f32).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound), "{}", p.name);
                // Spread over the interval, not a constant.
                let max = v.iter().cloned().fold(f32::MIN, f32::max);
                assert!(max > 0.5 * bound, "{}", p.name);
            } else if p.name.ends_with("running_var") || p.name.ends_with(".weight") {
                assert!(v.iter().all(|&x| x == 1.0), "{}", p.name);
            } else {
                assert!(v.iter().all(|&x| x == 0.0), "{}", p.name);
            }
        }
        assert_eq!(s, m.init_state(7));
        assert_ne!(s, m.init_state(8));
    }

    #[test]
    fn thousands() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(17900), "17,900");
        assert_eq!(group_thousands(1234567), "1,234,567");
    }
}
