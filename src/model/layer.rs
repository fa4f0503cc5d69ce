//! What each layer type is, in one place: its model-file `type` and keys, how it is read from a
//! model file's table and written back, its shape rule, its parameters (state_dict names, shapes and
//! kinds), its name and its summary line. The code that computes a type is named after it, op by op:
//! its CPU reference in `cpu/`, its WGSL kernel in `shaders/`, that kernel's launcher in `gpu/`, its
//! checks in `verify/`; its ONNX node is in `onnx.rs`, its PyTorch module in `scripts/torch_model.py`.
//! Poolings run through one entry each (`cpu::reference::pool::forward`, `gpu::pool::Pool::forward`,
//! `verify::pool::checks`), so a new pooling touches no executor.

use serde::Deserialize;

use super::shape::{ParamKind, Shape};

/// One layer of the network. Parameterised layers name their PyTorch module.
#[derive(Debug, Clone, PartialEq)]
pub enum Layer {
    /// k x k convolution, stride 1, with a bias per output channel or none.
    Conv {
        name: String,
        cin: usize,
        cout: usize,
        k: usize,
        pad: usize,
        bias: bool,
    },
    /// A fully connected layer over the flattened input (fin = c * h * w values per image), output
    /// fout x 1 x 1. Executed as a 1x1 convolution of an fin x 1 x 1 image, which is the same product.
    Linear {
        name: String,
        fin: usize,
        fout: usize,
        bias: bool,
    },
    BatchNorm {
        name: String,
        c: usize,
    },
    Relu,
    Dropout {
        p: f32,
    },
    /// 2x2 max pooling with stride 2.
    MaxPool2,
    /// 2x2 average pooling with stride 2.
    AvgPool2,
    /// The mean of each plane: one value per channel.
    GlobalAvgPool,
}

/// The widest layer a model file may ask for (channels or outputs), and the largest kernel and
/// padding: far beyond a small CNN, and small enough that no shape arithmetic can overflow.
const MAX_WIDTH: usize = 65_536;
const MAX_KERNEL: usize = 64;

/// The layer types a model file names, and the keys each takes besides `type`.
pub const TYPES: &[(&str, &[&str])] = &[
    ("conv", &["out", "kernel", "padding", "bias"]),
    ("linear", &["out", "bias"]),
    ("batchnorm", &[]),
    ("relu", &[]),
    ("dropout", &["p"]),
    ("maxpool", &[]),
    ("avgpool2", &[]),
    ("gap", &[]),
];

/// Older names a model file may still use: `avgpool` was the global average pooling's `type` before
/// the 2x2 average pooling came, and checkpoints hold model files that say so.
const ALIASES: &[(&str, &str)] = &[("avgpool", "gap")];

/// A model file's `[[layer]]` table, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LayerSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub out: Option<usize>,
    pub kernel: Option<usize>,
    pub padding: Option<usize>,
    pub bias: Option<bool>,
    pub p: Option<f32>,
}

/// Module names are numbered per kind in file order: conv1.., fc1.., bn1.. (the state_dict's names).
#[derive(Default)]
pub(super) struct Names {
    convs: usize,
    linears: usize,
    norms: usize,
}

/// One parameter tensor of a layer: its state_dict name, shape and kind.
pub type ParamSpec = (String, Vec<usize>, ParamKind);

impl Layer {
    /// The layer a model file's table describes. Its input size (channels, values) is filled in by
    /// `take_input`, as a file does not give it.
    pub(super) fn from_spec(spec: &LayerSpec, names: &mut Names) -> Result<Layer, String> {
        let kind = ALIASES.iter().find(|(old, _)| *old == spec.kind).map_or(spec.kind.as_str(), |(_, new)| new);
        let Some((_, keys)) = TYPES.iter().find(|(t, _)| *t == kind) else {
            let types: Vec<&str> = TYPES.iter().map(|t| t.0).collect();
            return Err(format!("unknown layer type {:?} (the types: {})", spec.kind, types.join(", ")));
        };
        let given = [
            ("out", spec.out.is_some()),
            ("kernel", spec.kernel.is_some()),
            ("padding", spec.padding.is_some()),
            ("bias", spec.bias.is_some()),
            ("p", spec.p.is_some()),
        ];
        if let Some((key, _)) = given.iter().find(|(key, set)| *set && !keys.contains(key)) {
            return Err(format!("a {} layer takes no `{key}`", spec.kind));
        }
        Ok(match kind {
            "conv" => {
                let need = |v: Option<usize>, key: &str| v.ok_or_else(|| format!("a conv layer needs `{key}`"));
                let (out, k) = (need(spec.out, "out")?, need(spec.kernel, "kernel")?);
                if out == 0 || k == 0 {
                    return Err("a conv layer's `out` and `kernel` must be at least 1".into());
                }
                if out > MAX_WIDTH || k > MAX_KERNEL || spec.padding.is_some_and(|p| p > MAX_KERNEL) {
                    return Err(format!(
                        "a conv layer's `out` is at most {MAX_WIDTH}, its `kernel` and `padding` at most {MAX_KERNEL}"
                    ));
                }
                names.convs += 1;
                // No bias unless asked (the recipe's convolutions have none).
                let (pad, bias) = (spec.padding.unwrap_or(0), spec.bias.unwrap_or(false));
                Layer::Conv { name: format!("conv{}", names.convs), cin: 0, cout: out, k, pad, bias }
            }
            "linear" => {
                let out = spec.out.ok_or("a linear layer needs `out`")?;
                if out == 0 || out > MAX_WIDTH {
                    return Err(format!("a linear layer's `out` must be 1 to {MAX_WIDTH}"));
                }
                names.linears += 1;
                // A bias unless told otherwise, as PyTorch's nn.Linear.
                Layer::Linear {
                    name: format!("fc{}", names.linears),
                    fin: 0,
                    fout: out,
                    bias: spec.bias.unwrap_or(true),
                }
            }
            "batchnorm" => {
                names.norms += 1;
                Layer::BatchNorm { name: format!("bn{}", names.norms), c: 0 }
            }
            "relu" => Layer::Relu,
            "dropout" => Layer::Dropout { p: spec.p.ok_or("a dropout layer needs `p`")? },
            "maxpool" => Layer::MaxPool2,
            "avgpool2" => Layer::AvgPool2,
            _ => Layer::GlobalAvgPool,
        })
    }

    /// The model file's table of this layer (after its `[[layer]]` line).
    pub fn toml(&self) -> String {
        match self {
            Layer::Conv { cout, k, pad, bias, .. } => {
                format!("type = \"conv\"\nout = {cout}\nkernel = {k}\npadding = {pad}\nbias = {bias}\n")
            }
            Layer::Linear { fout, bias, .. } => format!("type = \"linear\"\nout = {fout}\nbias = {bias}\n"),
            Layer::BatchNorm { .. } => "type = \"batchnorm\"\n".into(),
            Layer::Relu => "type = \"relu\"\n".into(),
            Layer::Dropout { p } => format!("type = \"dropout\"\np = {p:?}\n"),
            Layer::MaxPool2 => "type = \"maxpool\"\n".into(),
            Layer::AvgPool2 => "type = \"avgpool2\"\n".into(),
            Layer::GlobalAvgPool => "type = \"gap\"\n".into(),
        }
    }

    /// Fills in the input size a model file does not give: a convolution's or batchnorm's channels,
    /// a linear layer's values.
    pub(super) fn take_input(&mut self, input: Shape) {
        match self {
            Layer::Conv { cin, .. } => *cin = input.c,
            Layer::Linear { fin, .. } => *fin = input.len(),
            Layer::BatchNorm { c, .. } => *c = input.c,
            _ => {}
        }
    }

    /// Its output shape for an input of `input`, or why that input does not fit it.
    pub fn output_shape(&self, input: Shape) -> Result<Shape, String> {
        let s = input;
        match *self {
            Layer::Conv { ref name, cin, cout, k, pad, .. } => {
                if s.c != cin {
                    return Err(format!("{name} takes {cin} channels, its input has {}", s.c));
                }
                if k == 0 || pad >= k || s.h + 2 * pad < k || s.w + 2 * pad < k {
                    return Err(format!(
                        "{name}: a {k}x{k} kernel with padding {pad} does not fit its {}x{} input",
                        s.h, s.w
                    ));
                }
                Ok(Shape { c: cout, h: s.h + 2 * pad + 1 - k, w: s.w + 2 * pad + 1 - k })
            }
            Layer::Linear { ref name, fin, fout, .. } => {
                if s.len() != fin {
                    return Err(format!("{name} takes {fin} values, its input has {}", s.len()));
                }
                Ok(Shape { c: fout, h: 1, w: 1 })
            }
            Layer::BatchNorm { ref name, c } => {
                if s.c != c {
                    return Err(format!("{name} takes {c} channels, its input has {}", s.c));
                }
                Ok(s)
            }
            Layer::MaxPool2 | Layer::AvgPool2 => {
                if !s.h.is_multiple_of(2) || !s.w.is_multiple_of(2) {
                    let what = if *self == Layer::MaxPool2 { "max" } else { "average" };
                    return Err(format!(
                        "a 2x2 {what} pooling needs an even height and width, its input is {}x{}",
                        s.h, s.w
                    ));
                }
                Ok(Shape { c: s.c, h: s.h / 2, w: s.w / 2 })
            }
            Layer::GlobalAvgPool => Ok(Shape { c: s.c, h: 1, w: 1 }),
            Layer::Dropout { p } => {
                if !(0.0..1.0).contains(&p) {
                    return Err(format!("dropout probability {p} is not in [0, 1)"));
                }
                Ok(s)
            }
            Layer::Relu => Ok(s),
        }
    }

    /// Its parameter tensors: the trainable ones (in state_dict order), then the running statistics.
    pub fn params(&self) -> (Vec<ParamSpec>, Vec<ParamSpec>) {
        match *self {
            Layer::Conv { ref name, cin, cout, k, bias, .. } => {
                let fan_in = cin * k * k;
                (weight_and_bias(name, vec![cout, cin, k, k], fan_in, bias), Vec::new())
            }
            Layer::Linear { ref name, fin, fout, bias } => {
                (weight_and_bias(name, vec![fout, fin], fin, bias), Vec::new())
            }
            Layer::BatchNorm { ref name, c } => (
                vec![
                    (format!("{name}.weight"), vec![c], ParamKind::BatchNormWeight),
                    (format!("{name}.bias"), vec![c], ParamKind::BatchNormBias),
                ],
                vec![
                    (format!("{name}.running_mean"), vec![c], ParamKind::RunningMean),
                    (format!("{name}.running_var"), vec![c], ParamKind::RunningVar),
                ],
            ),
            _ => (Vec::new(), Vec::new()),
        }
    }

    /// A short name for the layer at index `i`: its module name (`conv2`, `bn2`), else its kind and
    /// index.
    pub fn name(&self, i: usize) -> String {
        match self {
            Layer::Conv { name, .. } | Layer::Linear { name, .. } | Layer::BatchNorm { name, .. } => name.clone(),
            Layer::Relu => format!("relu#{i}"),
            Layer::Dropout { .. } => format!("dropout#{i}"),
            Layer::MaxPool2 => format!("maxpool#{i}"),
            Layer::AvgPool2 => format!("avgpool2#{i}"),
            Layer::GlobalAvgPool => format!("gap#{i}"),
        }
    }

    /// Its row label in `summary`, after torchsummary's (the PyTorch module).
    pub fn summary_label(&self) -> String {
        match self {
            Layer::Conv { name, k, pad, bias, .. } => {
                format!("{name} (Conv2d {k}x{k}, pad {pad}{})", if *bias { ", bias" } else { "" })
            }
            Layer::Linear { name, bias, .. } => format!("{name} (Linear{})", if *bias { ", bias" } else { "" }),
            Layer::BatchNorm { name, .. } => format!("{name} (BatchNorm2d)"),
            Layer::Relu => "ReLU".into(),
            Layer::Dropout { p } => format!("Dropout (p={p})"),
            Layer::MaxPool2 => "MaxPool2d (2x2)".into(),
            Layer::AvgPool2 => "AvgPool2d (2x2)".into(),
            Layer::GlobalAvgPool => "AdaptiveAvgPool2d (1)".into(),
        }
    }

    /// A pooling: a layer of no parameters that reduces planes (see `cpu::reference::pool`, `gpu::pool`).
    pub fn is_pooling(&self) -> bool {
        matches!(self, Layer::MaxPool2 | Layer::AvgPool2 | Layer::GlobalAvgPool)
    }
}

/// A convolution's or linear layer's weight, and its bias if it has one.
fn weight_and_bias(name: &str, shape: Vec<usize>, fan_in: usize, bias: bool) -> Vec<ParamSpec> {
    let cout = shape[0];
    let mut tensors = vec![(format!("{name}.weight"), shape, ParamKind::ConvWeight { fan_in })];
    if bias {
        tensors.push((format!("{name}.bias"), vec![cout], ParamKind::ConvBias { fan_in }));
    }
    tensors
}
