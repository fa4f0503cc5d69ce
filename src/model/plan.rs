//! The execution plan: the model description lowered once into what every executor runs. It groups
//! the layers into ops (a batchnorm with the ReLU, dropout and pooling it absorbs; a convolution with
//! the max pooling it reads through, and in evaluation with the batchnorm after it), separately for
//! the training forward pass, the evaluation forward pass and the backward pass; it says which
//! buffer holds each layer's output and which layers run in place; and it cuts a training step into
//! the passes that the fused CPU executor takes each image through, between the points where the
//! whole batch must meet (`Passes`). The GPU's fusion lowering (`gpu::fusion`) turns each op into its
//! launches; `CpuNet` runs an op's layers one after another with the reference functions, and
//! `FusedNet` runs each pass image by image, both in the same buffers.

use std::ops::Range;

use super::layer::Layer;
use super::Model;

/// One op: the layers it computes, in order (the backward pass runs them in reverse).
pub type Op = Range<usize>;

/// What runs inside a batchnorm's ops besides the normalization.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NormFusion {
    /// A ReLU right after it (forward and backward).
    pub relu: bool,
    /// A dropout right after the ReLU: its layer (which keys its mask) and p. Its mask is read back
    /// from the output in the backward pass (0 wherever the ReLU or the dropout cut).
    pub dropout: Option<(usize, f32)>,
    /// A 2x2 max pooling right after those, whose backward runs in the batchnorm's (its winners found
    /// again in the output).
    pub maxpool: bool,
    /// The global average pooling that ends the network, right after it (or its ReLU): its backward
    /// runs in the batchnorm's, its forward in the loss.
    pub avgpool: bool,
}

/// One backward pass of the fused CPU executor: the batchnorm whose dx starts it (from the stored
/// gradient; None: the first pass, from dlogits), the layers below it down to the next batchnorm,
/// and that batchnorm (whose output gradient and sums end the pass; None: the last pass, down to the
/// input).
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardPass {
    pub from: Option<usize>,
    pub layers: Range<usize>,
    pub to: Option<usize>,
}

/// A training step cut at its batch-wide sync points: a batchnorm's statistics (forward) and its
/// gradient sums (backward). Between two, each image goes through every layer on its own. The linear
/// layers that end a network (with the ReLUs and dropouts between them) run after the forward passes
/// and before the backward ones, layer by layer over the whole batch: a linear layer's weights are
/// large next to an image's activations, so one product over the batch beats one per image.
#[derive(Debug, Clone, PartialEq)]
pub struct Passes {
    /// Each a range of layers whose first (after the first pass) is a batchnorm, normalizing with the
    /// statistics gathered at the end of the pass before. A batchnorm first (at 0) makes an empty first
    /// pass: its input's sums.
    pub forward: Vec<Range<usize>>,
    /// The first starts from the gradient at the output of the last layer before `batched`.
    pub backward: Vec<BackwardPass>,
    /// The layers run over the whole batch: the longest run of linear layers, ReLUs and dropouts that
    /// ends the network and starts with a linear layer (empty when there is none).
    pub batched: Range<usize>,
}

impl Passes {
    fn new(layers: &[Layer]) -> Passes {
        let batched = batched(layers);
        let count = batched.start;
        let norms: Vec<usize> = (0..count).filter(|&i| matches!(layers[i], Layer::BatchNorm { .. })).collect();
        let mut bounds = vec![0];
        bounds.extend(norms.iter().copied());
        bounds.push(count);
        let mut forward: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
        let mut backward = Vec::new();
        let mut top: Option<usize> = None;
        for &b in norms.iter().rev() {
            backward.push(BackwardPass { from: top, layers: b + 1..top.unwrap_or(count), to: Some(b) });
            top = Some(b);
        }
        backward.push(BackwardPass { from: top, layers: 0..top.unwrap_or(count), to: None });
        if count == 0 {
            // The whole network is batched.
            (forward, backward) = (Vec::new(), Vec::new());
        }
        Passes { forward, backward, batched }
    }
}

/// The layers that `Passes` runs over the whole batch.
fn batched(layers: &[Layer]) -> Range<usize> {
    let tail = |l: &Layer| matches!(l, Layer::Linear { .. } | Layer::Relu | Layer::Dropout { .. });
    let mut start = layers.len();
    while start > 0 && tail(&layers[start - 1]) {
        start -= 1;
    }
    while start < layers.len() && !matches!(layers[start], Layer::Linear { .. }) {
        start += 1;
    }
    start..layers.len()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The training forward pass, in order.
    pub forward: Vec<Op>,
    /// The evaluation forward pass, in order: dropout layers are the identity and in no op, and a
    /// batchnorm right after a convolution runs in the convolution's op.
    pub eval: Vec<Op>,
    /// The backward pass, in the order it runs (last layers first).
    pub backward: Vec<Op>,
    /// The global average pooling that ends the network, which runs inside the loss.
    pub pool_in_loss: Option<usize>,
    /// Per layer, the buffer of its training-mode output. A ReLU, and a dropout inside a batchnorm's
    /// op, write the buffer of the layer before them (in place).
    pub buffer: Vec<usize>,
    pub buffers: usize,
    /// Per layer, the buffer of its evaluation-mode output (None: the input batch itself, for dropout
    /// layers at the start, which evaluation skips).
    pub eval_buffer: Vec<Option<usize>>,
    /// Per layer: for a batchnorm, what runs in its ops.
    pub norm: Vec<NormFusion>,
    /// Per layer: a convolution that reads its input through the 2x2 max pooling before it.
    pub pooled_input: Vec<bool>,
    /// The fused CPU executor's passes.
    pub passes: Passes,
}

impl Plan {
    pub fn new(model: &Model) -> Plan {
        let layers = &model.layers;
        let count = layers.len();
        let (norm, in_norm) = absorbed(layers);
        let is = |i: usize, f: fn(&Layer) -> bool| i < count && f(&layers[i]);
        let pooled_input: Vec<bool> = (0..count)
            .map(|i| i > 0 && is(i, |l| matches!(l, Layer::Conv { .. })) && is(i - 1, |l| matches!(l, Layer::MaxPool2)))
            .collect();
        let pool_in_loss = is(count - 1, |l| matches!(l, Layer::GlobalAvgPool)).then_some(count - 1);
        let forward = forward_ops(layers, &norm, &pooled_input, pool_in_loss);
        let eval = eval_ops(layers, &forward);
        let backward = backward_ops(layers, &in_norm);
        let (buffer, buffers, eval_buffer) = buffers(layers, &in_norm);
        let passes = Passes::new(layers);
        Plan { forward, eval, backward, pool_in_loss, buffer, buffers, eval_buffer, norm, pooled_input, passes }
    }

    /// The plan in a few lines: each pass's ops, each as its layers joined by `+`.
    pub fn describe(&self, model: &Model) -> String {
        let ops = |ops: &[Op]| -> String {
            let names = ops.iter().map(|op| op.clone().map(|i| model.layer_name(i)).collect::<Vec<_>>().join("+"));
            names.collect::<Vec<_>>().join(" | ")
        };
        let loss = match self.pool_in_loss {
            Some(i) => format!(" | loss (with {})", model.layer_name(i)),
            None => " | loss".into(),
        };
        format!(
            "Execution plan ({} ops per training step with the loss and the update, {} per evaluation batch):\n\
             training forward: {}{loss}\nbackward: {}\nevaluation: {}{loss}\n",
            self.forward.len() + self.backward.len() + 2,
            self.eval.len() + 1,
            ops(&self.forward),
            ops(&self.backward),
            ops(&self.eval),
        )
    }

    /// The buffer of layer `i`'s output in a training pass, or in an evaluation pass (None: the input
    /// batch itself, for dropout layers at the start, which evaluation skips).
    pub fn output_buffer(&self, i: usize, training: bool) -> Option<usize> {
        if training {
            Some(self.buffer[i])
        } else {
            self.eval_buffer[i]
        }
    }

    /// Whether layer `i` writes the buffer of the layer before it.
    pub fn in_place(&self, i: usize) -> bool {
        i > 0 && self.buffer[i] == self.buffer[i - 1]
    }
}

/// What each batchnorm absorbs: a ReLU, then (after a ReLU) a dropout, then a max pooling or the
/// network's final global average pooling (this one only right after the batchnorm or its ReLU).
/// Also per layer, the batchnorm whose ops it runs in (training forward: ReLU and dropout; backward:
/// also the poolings).
fn absorbed(layers: &[Layer]) -> (Vec<NormFusion>, Vec<Option<usize>>) {
    let count = layers.len();
    let is = |i: usize, f: fn(&Layer) -> bool| i < count && f(&layers[i]);
    let last = count - 1;
    let mut norm = vec![NormFusion::default(); count];
    let mut in_norm = vec![None; count];
    for i in (0..count).filter(|&i| matches!(layers[i], Layer::BatchNorm { .. })) {
        let mut j = i + 1;
        if is(j, |l| matches!(l, Layer::Relu)) {
            norm[i].relu = true;
            in_norm[j] = Some(i);
            j += 1;
            if let Some(&Layer::Dropout { p }) = layers.get(j) {
                norm[i].dropout = Some((j, p));
                in_norm[j] = Some(i);
                j += 1;
            }
        }
        if is(j, |l| matches!(l, Layer::MaxPool2)) {
            norm[i].maxpool = true;
            in_norm[j] = Some(i);
        } else if j == last && norm[i].dropout.is_none() && is(j, |l| matches!(l, Layer::GlobalAvgPool)) {
            norm[i].avgpool = true;
            in_norm[j] = Some(i);
        }
    }
    (norm, in_norm)
}

/// Whether layer `i` is a dropout right after a ReLU that runs in the epilogue of the convolution,
/// linear layer or 2x2 pooling before it: the dropout then runs in that epilogue too (forward), and
/// with the ReLU's backward (backward), its mask read back from its output as a batchnorm's is.
fn relu_dropout(layers: &[Layer], i: usize) -> bool {
    i >= 2
        && matches!(layers.get(i), Some(Layer::Dropout { .. }))
        && matches!(layers[i - 1], Layer::Relu)
        && matches!(layers[i - 2], Layer::Conv { .. } | Layer::Linear { .. } | Layer::MaxPool2 | Layer::AvgPool2)
}

/// Training forward: a batchnorm with its ReLU and dropout; a max pooling with the convolution that
/// reads through it; a convolution, linear layer or 2x2 pooling with the ReLU right after it, and a
/// dropout right after that (in its epilogue); the final global average pooling in the loss; the rest
/// alone.
fn forward_ops(layers: &[Layer], norm: &[NormFusion], pooled_input: &[bool], pool_in_loss: Option<usize>) -> Vec<Op> {
    let mut forward = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let end = match layers[i] {
            Layer::BatchNorm { .. } => {
                let f = norm[i];
                i + 1 + f.relu as usize + f.dropout.is_some() as usize
            }
            Layer::MaxPool2 if pooled_input.get(i + 1) == Some(&true) => i + 2,
            Layer::GlobalAvgPool if pool_in_loss == Some(i) => break,
            _ => i + 1,
        };
        let takes_relu =
            matches!(layers[end - 1], Layer::Conv { .. } | Layer::Linear { .. } | Layer::MaxPool2 | Layer::AvgPool2);
        let end = if takes_relu && matches!(layers.get(end), Some(Layer::Relu)) { end + 1 } else { end };
        let end = if relu_dropout(layers, end) { end + 1 } else { end };
        forward.push(i..end);
        i = end;
    }
    forward
}

/// Evaluation: as training, with a batchnorm (and what it absorbs) inside the convolution before it,
/// and no dropout op.
fn eval_ops(layers: &[Layer], forward: &[Op]) -> Vec<Op> {
    let mut eval: Vec<Op> = Vec::new();
    for op in forward {
        // A dropout in a convolution's or pooling's epilogue is the identity here.
        let op = &match relu_dropout(layers, op.end - 1) {
            true => op.start..op.end - 1,
            false => op.clone(),
        };
        let after_conv = matches!(layers[op.start], Layer::BatchNorm { .. })
            && eval
                .last()
                .is_some_and(|prev| matches!(layers[prev.end - 1], Layer::Conv { .. } | Layer::Linear { .. }));
        if after_conv {
            eval.last_mut().expect("checked").end = op.end;
        } else if !matches!(layers[op.start], Layer::Dropout { .. }) {
            eval.push(op.clone());
        }
    }
    eval
}

/// Backward: a batchnorm with everything it absorbs; a ReLU with the dropout of its epilogue; the rest
/// alone (a convolution reads through its max pooling, whose backward then runs in the batchnorm's or
/// alone).
fn backward_ops(layers: &[Layer], in_norm: &[Option<usize>]) -> Vec<Op> {
    let mut backward = Vec::new();
    let mut end = in_norm.len();
    while end > 0 {
        let top = end - 1;
        let start = if relu_dropout(layers, top) { top - 1 } else { in_norm[top].unwrap_or(top) };
        backward.push(start..end);
        end = start;
    }
    backward
}

/// Buffers: ReLUs and a batchnorm's dropout run in place (only their own backward reads their output,
/// and what they keep of it is enough); every other layer writes a buffer of its own. Returns each
/// layer's training buffer, their count, and each layer's evaluation buffer.
fn buffers(layers: &[Layer], in_norm: &[Option<usize>]) -> (Vec<usize>, usize, Vec<Option<usize>>) {
    let count = layers.len();
    let mut buffer = Vec::with_capacity(count);
    let mut buffers = 0;
    for i in 0..count {
        let in_place = i > 0
            && (matches!(layers[i], Layer::Relu)
                || (matches!(layers[i], Layer::Dropout { .. }) && in_norm[i].is_some()));
        if in_place {
            buffer.push(buffer[i - 1]);
        } else {
            buffer.push(buffers);
            buffers += 1;
        }
    }
    let mut eval_buffer: Vec<Option<usize>> = Vec::with_capacity(count);
    for i in 0..count {
        let through = matches!(layers[i], Layer::Dropout { .. });
        eval_buffer.push(if through { i.checked_sub(1).and_then(|j| eval_buffer[j]) } else { Some(buffer[i]) });
    }
    (buffer, buffers, eval_buffer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::file::parse;
    use crate::model::Shape;

    #[test]
    fn net3_lowers_into_fused_ops() {
        let m = Model::net3();
        let p = Plan::new(&m);
        // conv1 | bn1 relu | conv2 | bn2 relu dropout | maxpool conv3 | bn3 relu | conv4 | bn4 relu |
        // maxpool conv5 | bn5 relu | conv6 | bn6 relu; the average pooling in the loss.
        let forward = vec![0..1, 1..3, 3..4, 4..7, 7..9, 9..11, 11..12, 12..14, 14..16, 16..18, 18..19, 19..21];
        assert_eq!(p.forward, forward);
        assert_eq!(p.pool_in_loss, Some(21));
        let eval = vec![0..3, 3..7, 7..11, 11..14, 14..18, 18..21];
        assert_eq!(p.eval, eval);
        let backward = vec![19..22, 18..19, 16..18, 15..16, 12..15, 11..12, 9..11, 8..9, 4..8, 3..4, 1..3, 0..1];
        assert_eq!(p.backward, backward);
        assert_eq!(p.norm[4], NormFusion { relu: true, dropout: Some((6, 0.05)), maxpool: true, avgpool: false });
        assert_eq!(p.norm[19], NormFusion { relu: true, dropout: None, maxpool: false, avgpool: true });
        assert!(p.pooled_input[8] && p.pooled_input[15] && !p.pooled_input[3]);
        // bn2's ReLU and dropout write its buffer; the pooling has one of its own.
        assert_eq!((p.buffer[4], p.buffer[5], p.buffer[6], p.buffer[7]), (3, 3, 3, 4));
        assert!(p.in_place(5) && p.in_place(6) && !p.in_place(7));
        let text = p.describe(&m);
        assert!(text.contains("(26 ops per training step") && text.contains("7 per evaluation batch"), "{text}");
        assert!(text.contains("| bn2+relu#5+dropout#6 | maxpool#7+conv3 |"), "{text}");
        assert!(text.contains("backward: bn6+relu#20+gap#21 | conv6 |"), "{text}");
        // The fused CPU executor's passes: cut at the six batchnorms, 7 forward and 7 backward.
        assert_eq!(p.passes.forward, vec![0..1, 1..4, 4..9, 9..12, 12..16, 16..19, 19..22]);
        assert!(p.passes.batched.is_empty());
        let backward: Vec<_> = p.passes.backward.iter().map(|b| (b.from, b.layers.clone(), b.to)).collect();
        assert_eq!(
            backward,
            vec![
                (None, 20..22, Some(19)),
                (Some(19), 17..19, Some(16)),
                (Some(16), 13..16, Some(12)),
                (Some(12), 10..12, Some(9)),
                (Some(9), 5..9, Some(4)),
                (Some(4), 2..4, Some(1)),
                (Some(1), 0..1, None),
            ]
        );
    }

    /// conv, max pooling, ReLU, conv, max pooling, ReLU, linear, ReLU, linear.
    const FAST_RECIPE: &str = include_str!("../../models/fast-recipe.toml");

    #[test]
    fn a_relu_joins_its_convolution_or_pooling_and_the_rest_runs_alone() {
        let mnist = Shape { c: 1, h: 28, w: 28 };
        let text = "[[layer]]\ntype = \"dropout\"\np = 0.1\n[[layer]]\ntype = \"conv\"\nout = 4\nkernel = 3\n\
                    [[layer]]\ntype = \"relu\"\n[[layer]]\ntype = \"maxpool\"\n[[layer]]\ntype = \"linear\"\nout = 10\n";
        let m = parse(text, "m.toml", mnist, 10).unwrap();
        let p = Plan::new(&m);
        // The ReLU runs in the convolution's op (its epilogue on the GPU); backward, alone.
        assert_eq!(p.forward, vec![0..1, 1..3, 3..4, 4..5]);
        assert_eq!(Plan::new(&parse(FAST_RECIPE, "f.toml", mnist, 10).unwrap()).forward[..4], [0..1, 1..3, 3..4, 4..6]);
        assert_eq!(p.eval, vec![1..3, 3..4, 4..5]);
        assert_eq!(p.backward, vec![4..5, 3..4, 2..3, 1..2, 0..1]);
        // The leading dropout is skipped in evaluation: the convolution reads the batch itself.
        assert_eq!(p.eval_buffer[0], None);
        assert!(p.in_place(2) && !p.in_place(0) && !p.pooled_input[4]);
    }

    #[test]
    fn the_linear_layers_that_end_a_network_run_over_the_whole_batch() {
        let mnist = Shape { c: 1, h: 28, w: 28 };
        let p = Plan::new(&parse(FAST_RECIPE, "f.toml", mnist, 10).unwrap());
        // conv1 maxpool relu conv2 maxpool relu, image by image; fc1 relu fc2 over the batch.
        assert_eq!((p.passes.forward.len(), p.passes.forward[0].clone(), p.passes.batched.clone()), (1, 0..6, 6..9));
        assert_eq!(p.passes.backward, vec![BackwardPass { from: None, layers: 0..6, to: None }]);
        // A network of linear layers only: no per-image pass.
        let mlp = Plan::new(&parse(include_str!("../../models/mlp3.toml"), "m.toml", mnist, 10).unwrap());
        assert!(mlp.passes.forward.is_empty() && mlp.passes.backward.is_empty() && mlp.passes.batched == (0..5));
        // A ReLU or a dropout before the first linear layer stays in the per-image pass.
        let text = "[[layer]]\ntype = \"conv\"\nout = 4\nkernel = 3\n[[layer]]\ntype = \"batchnorm\"\n\
                    [[layer]]\ntype = \"relu\"\n[[layer]]\ntype = \"dropout\"\np = 0.1\n\
                    [[layer]]\ntype = \"linear\"\nout = 10\n";
        let p = Plan::new(&parse(text, "m.toml", mnist, 10).unwrap());
        assert_eq!((p.passes.forward.clone(), p.passes.batched.clone()), (vec![0..1, 1..4], 4..5));
        let backward = vec![
            BackwardPass { from: None, layers: 2..4, to: Some(1) },
            BackwardPass { from: Some(1), layers: 0..1, to: None },
        ];
        assert_eq!(p.passes.backward, backward);
    }

    #[test]
    fn a_dropout_after_a_relu_epilogue_joins_it_and_its_backward() {
        let text = include_str!("../../tests/fixtures/dropout_epilogues.toml");
        let p = Plan::new(&parse(text, "dropout_epilogues.toml", Shape { c: 1, h: 28, w: 28 }, 10).unwrap());
        // conv1 relu dropout | maxpool relu dropout | conv2 | dropout | avgpool2 relu dropout |
        // fc1 relu dropout | fc2
        assert_eq!(p.forward, vec![0..3, 3..6, 6..7, 7..8, 8..11, 11..14, 14..15]);
        // Evaluation leaves every dropout out.
        assert_eq!(p.eval, vec![0..2, 3..5, 6..7, 8..10, 11..13, 14..15]);
        // Backward: each ReLU with the dropout after it; the lone dropout alone.
        let backward = vec![14..15, 12..14, 11..12, 9..11, 8..9, 7..8, 6..7, 4..6, 3..4, 1..3, 0..1];
        assert_eq!(p.backward, backward);
        // The buffers are as before: a dropout writes one of its own.
        assert!(p.in_place(1) && !p.in_place(2) && p.in_place(12) && !p.in_place(13));
    }
}
