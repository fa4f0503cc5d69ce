//! The evaluation-mode network as an ONNX model (opset 13): Conv, BatchNormalization, Relu, MaxPool,
//! AveragePool, GlobalAveragePool, Flatten, Gemm and Unsqueeze nodes over NCHW tensors, the weights as
//! initializers under their state_dict names, input `input` (N x 1 x 28 x 28, N free) and output `logits` (N x
//! classes). Dropout is the identity in evaluation and writes no node. The protobuf is written by hand:
//! the handful of ONNX messages used here need nothing more than varints and length-delimited fields,
//! and `read` parses them back for the tests.

use crate::model::{Layer, LayerParams, Model, BN_EPS};

pub const OPSET: i64 = 13;
/// The ONNX IR version that goes with opset 13.
const IR_VERSION: i64 = 7;
const FLOAT: i64 = 1;
const INT64: i64 = 7;

/// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED32: u32 = 5;
const BYTES: u32 = 2;

/// A protobuf message being written, field by field.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn tag(&mut self, field: u32, wire: u32) {
        self.varint(((field << 3) | wire) as u64);
    }
    fn int(&mut self, field: u32, v: i64) -> &mut Msg {
        self.tag(field, VARINT);
        self.varint(v as u64);
        self
    }
    fn float(&mut self, field: u32, v: f32) -> &mut Msg {
        self.tag(field, FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Msg {
        self.tag(field, BYTES);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, field: u32, s: &str) -> &mut Msg {
        self.bytes(field, s.as_bytes())
    }
    fn msg(&mut self, field: u32, m: &Msg) -> &mut Msg {
        self.bytes(field, &m.0)
    }
}

/// A node attribute (AttributeProto): a list of ints, an int or a float.
enum Attr {
    Ints(Vec<i64>),
    Int(i64),
    Float(f32),
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str, attrs: &[(&str, Attr)]) -> Msg {
    let mut n = Msg::default();
    for input in inputs {
        n.str(1, input);
    }
    n.str(2, output).str(3, name).str(4, op);
    for (key, value) in attrs {
        let mut a = Msg::default();
        a.str(1, key);
        match value {
            Attr::Float(f) => a.float(2, *f).int(20, 1),
            Attr::Int(i) => a.int(3, *i).int(20, 2),
            Attr::Ints(list) => {
                list.iter().for_each(|&i| {
                    a.int(8, i);
                });
                a.int(20, 7)
            }
        };
        n.msg(5, &a);
    }
    n
}

/// A float32 or int64 initializer (TensorProto with raw little-endian data).
fn tensor(name: &str, dims: &[usize], data_type: i64, raw: &[u8]) -> Msg {
    let mut t = Msg::default();
    dims.iter().for_each(|&d| {
        t.int(1, d as i64);
    });
    t.int(2, data_type).str(8, name).bytes(9, raw);
    t
}

/// A graph input or output (ValueInfoProto): a float tensor whose first dimension is the batch.
fn value_info(name: &str, dims: &[usize]) -> Msg {
    let mut shape = Msg::default();
    let mut batch = Msg::default();
    batch.str(2, "N");
    shape.msg(1, &batch);
    for &d in dims {
        let mut dim = Msg::default();
        dim.int(1, d as i64);
        shape.msg(1, &dim);
    }
    let mut tensor_type = Msg::default();
    tensor_type.int(1, FLOAT).msg(2, &shape);
    let mut type_proto = Msg::default();
    type_proto.msg(1, &tensor_type);
    let mut v = Msg::default();
    v.str(1, name).msg(2, &type_proto);
    v
}

/// The ONNX model of `model` in evaluation mode, with the parameters and running statistics of `state`.
pub fn export(model: &Model, state: &[f32]) -> Vec<u8> {
    assert_eq!(state.len(), model.num_state, "state buffer length");
    let mut graph = Msg::default();
    graph.str(2, "mnist-wgpu");
    let f32_bytes = |index: usize| -> Vec<u8> {
        let p = &model.params[index];
        state[p.offset..p.offset + p.len].iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    let mut initializers = Vec::new();
    let mut weight = |index: usize| -> String {
        let p = &model.params[index];
        initializers.push(tensor(&p.name, &p.shape, FLOAT, &f32_bytes(index)));
        p.name.clone()
    };
    // Every tensor stays N x C x H x W: a linear layer's output is unsqueezed back to N x out x 1 x 1,
    // as the executors keep it, and the logits are flattened at the end.
    let mut current = "input".to_string();
    let mut nodes = Vec::new();
    let mut unsqueeze_axes = false;
    for (i, layer) in model.layers.iter().enumerate() {
        let name = model.layer_name(i);
        let out = format!("{name}.out");
        match (layer, model.layer_params[i]) {
            (&Layer::Conv { k, pad, .. }, LayerParams::Conv { weight: w, bias }) => {
                let (w, b) = (weight(w), bias.map(&mut weight));
                let mut inputs = vec![current.as_str(), w.as_str()];
                inputs.extend(b.as_deref());
                let (k, pad) = (k as i64, pad as i64);
                let attrs = [
                    ("kernel_shape", Attr::Ints(vec![k, k])),
                    ("pads", Attr::Ints(vec![pad; 4])),
                    ("strides", Attr::Ints(vec![1, 1])),
                ];
                nodes.push(node("Conv", &name, &inputs, &out, &attrs));
            }
            (Layer::Linear { .. }, LayerParams::Conv { weight: w, bias }) => {
                let flat = format!("{name}.flat");
                nodes.push(node("Flatten", &format!("{name}.flatten"), &[&current], &flat, &[("axis", Attr::Int(1))]));
                let (w, b) = (weight(w), bias.map(&mut weight));
                let mut inputs = vec![flat.as_str(), w.as_str()];
                inputs.extend(b.as_deref());
                let gemm = format!("{name}.gemm");
                nodes.push(node("Gemm", &name, &inputs, &gemm, &[("transB", Attr::Int(1))]));
                nodes.push(node("Unsqueeze", &format!("{name}.unsqueeze"), &[&gemm, "axes_2_3"], &out, &[]));
                unsqueeze_axes = true;
            }
            (Layer::BatchNorm { .. }, LayerParams::BatchNorm { weight: g, bias, running_mean, running_var }) => {
                let inputs = [weight(g), weight(bias), weight(running_mean), weight(running_var)];
                let inputs = [current.as_str(), &inputs[0], &inputs[1], &inputs[2], &inputs[3]];
                nodes.push(node("BatchNormalization", &name, &inputs, &out, &[("epsilon", Attr::Float(BN_EPS))]));
            }
            (Layer::Relu, _) => nodes.push(node("Relu", &name, &[&current], &out, &[])),
            (Layer::Dropout { .. }, _) => continue, // the identity in evaluation
            (Layer::MaxPool2, _) => {
                let attrs = [("kernel_shape", Attr::Ints(vec![2, 2])), ("strides", Attr::Ints(vec![2, 2]))];
                nodes.push(node("MaxPool", &name, &[&current], &out, &attrs));
            }
            (Layer::AvgPool2, _) => {
                let attrs = [("kernel_shape", Attr::Ints(vec![2, 2])), ("strides", Attr::Ints(vec![2, 2]))];
                nodes.push(node("AveragePool", &name, &[&current], &out, &attrs));
            }
            (Layer::GlobalAvgPool, _) => nodes.push(node("GlobalAveragePool", &name, &[&current], &out, &[])),
            (layer, params) => unreachable!("layer {layer:?} with parameters {params:?}"),
        }
        current = out;
    }
    nodes.push(node("Flatten", "logits", &[&current], "logits", &[("axis", Attr::Int(1))]));
    if unsqueeze_axes {
        let axes: Vec<u8> = [2i64, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        initializers.push(tensor("axes_2_3", &[2], INT64, &axes));
    }
    for n in &nodes {
        graph.msg(1, n);
    }
    for t in &initializers {
        graph.msg(5, t);
    }
    let input = model.input;
    graph.msg(11, &value_info("input", &[input.c, input.h, input.w]));
    graph.msg(12, &value_info("logits", &[model.output_classes()]));

    let mut opset = Msg::default();
    opset.str(1, "").int(2, OPSET);
    let mut m = Msg::default();
    m.int(1, IR_VERSION).str(2, "mnist-wgpu").str(3, env!("CARGO_PKG_VERSION")).msg(7, &graph).msg(8, &opset);
    m.0
}

/// One field of a parsed protobuf message: its number and its value.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Int(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
}

/// The fields of one protobuf message, in order (nested messages stay bytes: parse them again).
pub fn read(mut b: &[u8]) -> Result<Vec<(u32, Field)>, String> {
    fn varint(b: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    let mut fields = Vec::new();
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        let field = (tag >> 3) as u32;
        let value = match (tag & 7) as u32 {
            VARINT => Field::Int(varint(&mut b)?),
            FIXED32 => {
                let (word, rest) = b.split_at_checked(4).ok_or("truncated fixed32")?;
                b = rest;
                Field::Fixed32(u32::from_le_bytes(word.try_into().expect("4 bytes")))
            }
            BYTES => {
                let len = varint(&mut b)? as usize;
                let (bytes, rest) = b.split_at_checked(len).ok_or("truncated bytes field")?;
                b = rest;
                Field::Bytes(bytes.to_vec())
            }
            wire => return Err(format!("unexpected wire type {wire}")),
        };
        fields.push((field, value));
    }
    Ok(fields)
}
