//! The fusion lowering: the plan of a model, at one batch size, turned into the GPU's launch lists.
//! It is the one place that decides what runs inside what on the GPU: which convolutions split their
//! forward sum, which write a training batchnorm's statistics from their forward epilogue or its
//! backward sums from their dx epilogue, which weight gradients arrive in slices, which convolutions
//! and poolings apply the ReLU after them (and a dropout after that) in their forward epilogue, and
//! which launches (each an entry point named for what it fuses) a training step and an evaluation
//! batch record.
//! `GpuNet` records what it says; `verify` asks it what to check.
//!
//! Partial sums, one word each throughout the GPU code:
//! - **parts**: a convolution's forward output written as several whole copies, each the sum over a
//!   share of its depth (`splits` of them); the batchnorm statistics add the parts.
//! - **partials**: a batchnorm's sums over a channel's elements, one per tile of positions (from a
//!   convolution's epilogue) or one per span of the channel (from its own reduction launch).
//! - **slices**: a weight gradient's sum over positions cut into shares, each written apart
//!   (`SlicedGrad`); the SGD kernel adds them.
//! - **spans**: the shares of a channel's elements that a batchnorm's workgroups take, one each
//!   (`bn_spans`).

use super::batchnorm::{bn_spans, BnLayer, BnOffsets};
use super::conv::{forward_splits, weight_grad_slices, Conv, ConvGrad, ConvLayer};
use super::dropout::FusedDropout;
use super::update::SlicedGrad;
use crate::model::plan::{Op, Plan};
use crate::model::{Layer, LayerParams, Model, BN_EPS, BN_MOMENTUM};

/// What a convolution's forward launch does after its product (conv.wgsl's forward entry points).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFusion {
    /// `forward`, its sum in this many parts.
    Plain { splits: usize },
    /// `forward_bn_stats`: the forward partials of the training batchnorm at this layer.
    BnStats { bn: usize },
    /// `forward_bn_eval`: the evaluation-mode batchnorm at this layer (and its ReLU) applied.
    BnEval { bn: usize },
    /// `forward_relu`: the ReLU after this layer (one no batchnorm absorbs) applied.
    Relu,
    /// `forward_relu_dropout`: that ReLU, then the dropout right after it (at this layer).
    ReluDropout { dropout: usize },
}

/// What a convolution's backward launch computes besides its weight gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DxFusion {
    /// `backward_weights`: no dx (the first layer).
    None,
    /// `backward`: dx.
    Dx,
    /// `backward_bn_sums`: dx, and the backward partials of the batchnorm at this layer.
    BnSums { bn: usize },
}

/// One launch (or, for a training batchnorm, its one or two launches) of a pass, and the layer it
/// belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    ConvForward {
        layer: usize,
        fusion: ForwardFusion,
    },
    ConvBackward {
        layer: usize,
        fusion: DxFusion,
    },
    /// Training: the statistics (unless a convolution's epilogue wrote them), then the normalization
    /// with the ReLU and dropout it absorbs.
    BatchNormTrain {
        layer: usize,
    },
    BatchNormEval {
        layer: usize,
    },
    /// The partials (unless a convolution's dx epilogue wrote them), then dx, through the ReLU,
    /// dropout and pooling the batchnorm absorbs.
    BatchNormBackward {
        layer: usize,
    },
    /// Forward and backward are the same launch: the mask applied.
    Dropout {
        layer: usize,
    },
    /// A pooling on its own (one that the batchnorm before, the convolution after or the loss does
    /// not absorb).
    Pool {
        layer: usize,
    },
    PoolBackward {
        layer: usize,
    },
    /// A 2x2 pooling with the ReLU after it (one no batchnorm absorbs) in its epilogue.
    PoolRelu {
        layer: usize,
    },
    /// The same, and the dropout after that ReLU (at `layer + 2`).
    PoolReluDropout {
        layer: usize,
    },
    /// A ReLU on its own (one that no batchnorm before it absorbs): in place in training.
    Relu {
        layer: usize,
    },
    ReluBackward {
        layer: usize,
    },
    /// The backward of a ReLU and of the dropout after it (at `layer + 1`), which ran in the epilogue
    /// before them.
    ReluDropoutBackward {
        layer: usize,
    },
}

/// What the op of convolution (or pooling) `c` holds after it: the ReLU right after it, and the
/// dropout after that ReLU (the plan puts a ReLU that no batchnorm absorbs, and such a dropout, into the
/// op of the convolution, linear layer or pooling before them).
fn epilogue_layers(model: &Model, op: &Op, c: usize) -> (bool, Option<usize>) {
    let relu = op.end >= c + 2 && matches!(model.layers[c + 1], Layer::Relu);
    let dropout = (relu && op.end == c + 3 && matches!(model.layers[c + 2], Layer::Dropout { .. })).then_some(c + 2);
    (relu, dropout)
}

/// A convolution's forward launch with no batchnorm after it: with the ReLU (and dropout) of its op.
fn relu_fusion(model: &Model, op: &Op, c: usize) -> Option<ForwardFusion> {
    match epilogue_layers(model, op, c) {
        (true, Some(dropout)) => Some(ForwardFusion::ReluDropout { dropout }),
        (true, None) => Some(ForwardFusion::Relu),
        _ => None,
    }
}

/// A pooling's forward launch: with the ReLU (and dropout) after it when its op holds them.
fn pool_launch(model: &Model, op: &Op) -> Launch {
    let layer = op.start;
    match epilogue_layers(model, op, layer) {
        (true, Some(_)) => Launch::PoolReluDropout { layer },
        (true, None) => Launch::PoolRelu { layer },
        _ => Launch::Pool { layer },
    }
}

/// The GPU's launch lists for a model at batch size `n`.
#[derive(Debug, Clone)]
pub struct Fusion {
    pub plan: Plan,
    pub n: usize,
    /// Per layer: the parts a training convolution's forward sum is split into (1: not split).
    pub splits: Vec<usize>,
    /// Per batchnorm: the convolution whose forward epilogue writes its statistics' partials.
    pub stats_from: Vec<Option<usize>>,
    /// Per batchnorm: the convolution whose dx epilogue writes its backward partials.
    pub sums_from: Vec<Option<usize>>,
    /// The weight gradients summed in slices, in layer order, and the extra room their slices past
    /// the first take after the trainable prefix of the gradient buffer.
    pub sliced: Vec<SlicedGrad>,
    pub sliced_extra: usize,
    /// The passes, one entry per op of the plan, in the order they run.
    pub forward: Vec<(Op, Launch)>,
    pub eval: Vec<(Op, Launch)>,
    pub backward: Vec<(Op, Launch)>,
}

impl Fusion {
    pub fn new(model: &Model, n: usize) -> Fusion {
        let plan = Plan::new(model);
        let count = model.layers.len();
        // A training convolution followed by a batchnorm splits its sum when its tiles are few.
        let splits: Vec<usize> = (0..count)
            .map(|i| match (model.conv(i, n), model.layers.get(i + 1)) {
                (Some((d, _)), Some(Layer::BatchNorm { .. })) => forward_splits(&d),
                _ => 1,
            })
            .collect();
        let is_bn = |i: usize| matches!(model.layers[i], Layer::BatchNorm { .. });
        // A batchnorm right after a convolution of one part gets its statistics from its epilogue;
        // one whose output a convolution reads gets its backward sums from that one's dx.
        let stats_from: Vec<Option<usize>> = (0..count)
            .map(|i| {
                let before = i.checked_sub(1)?;
                (is_bn(i) && matches!(model.layers[before], Layer::Conv { .. }) && splits[before] == 1)
                    .then_some(before)
            })
            .collect();
        let sums_from: Vec<Option<usize>> =
            (0..count).map(|i| is_bn(i).then(|| conv_reading(model, &plan, i)).flatten()).collect();
        let (sliced, sliced_extra) = sliced_grads(model);
        let mut f = Fusion {
            plan,
            n,
            splits,
            stats_from,
            sums_from,
            sliced,
            sliced_extra,
            forward: Vec::new(),
            eval: Vec::new(),
            backward: Vec::new(),
        };
        f.forward = f.plan.forward.iter().map(|op| (op.clone(), f.forward_launch(model, op))).collect();
        f.eval = f.plan.eval.iter().map(|op| (op.clone(), f.eval_launch(model, op))).collect();
        f.backward = f.plan.backward.iter().map(|op| (op.clone(), f.backward_launch(model, op))).collect();
        f
    }

    /// The convolution (or linear layer) an op runs: its first layer, or the one after the max
    /// pooling it reads through.
    fn conv_of(&self, model: &Model, op: &Op) -> Option<usize> {
        match model.layers[op.start] {
            Layer::Conv { .. } | Layer::Linear { .. } => Some(op.start),
            Layer::MaxPool2 if op.len() > 1 && matches!(model.layers[op.start + 1], Layer::Conv { .. }) => {
                Some(op.start + 1)
            }
            _ => None,
        }
    }

    fn forward_launch(&self, model: &Model, op: &Op) -> Launch {
        let layer = op.start;
        if let Some(c) = self.conv_of(model, op) {
            let next = c + 1;
            let fusion = match (relu_fusion(model, op, c), self.stats_from.get(next)) {
                (Some(fusion), _) => fusion,
                (None, Some(&Some(from))) if from == c => ForwardFusion::BnStats { bn: next },
                _ => ForwardFusion::Plain { splits: self.splits[c] },
            };
            return Launch::ConvForward { layer: c, fusion };
        }
        match model.layers[layer] {
            Layer::BatchNorm { .. } => Launch::BatchNormTrain { layer },
            Layer::Dropout { .. } => Launch::Dropout { layer },
            Layer::Relu => Launch::Relu { layer },
            ref pooling if pooling.is_pooling() => pool_launch(model, op),
            ref other => unreachable!("{other:?} alone in the forward pass"),
        }
    }

    /// Evaluation: a batchnorm after a convolution is an affine map per channel, run in the
    /// convolution's epilogue (the plan puts it in the convolution's op).
    fn eval_launch(&self, model: &Model, op: &Op) -> Launch {
        let layer = op.start;
        if let Some(c) = self.conv_of(model, op) {
            let fusion = match (relu_fusion(model, op, c), model.layers.get(c + 1)) {
                (Some(fusion), _) => fusion,
                (None, Some(Layer::BatchNorm { .. })) if op.end > c + 1 => ForwardFusion::BnEval { bn: c + 1 },
                _ => ForwardFusion::Plain { splits: 1 },
            };
            return Launch::ConvForward { layer: c, fusion };
        }
        match model.layers[layer] {
            Layer::BatchNorm { .. } => Launch::BatchNormEval { layer },
            Layer::Relu => Launch::Relu { layer },
            ref pooling if pooling.is_pooling() => pool_launch(model, op),
            ref other => unreachable!("{other:?} alone in evaluation"),
        }
    }

    fn backward_launch(&self, model: &Model, op: &Op) -> Launch {
        let layer = op.start;
        match model.layers[layer] {
            Layer::Conv { .. } | Layer::Linear { .. } => {
                let bn = (0..model.layers.len()).find(|&b| self.sums_from[b] == Some(layer));
                // The input image needs no gradient.
                let fusion = match bn {
                    _ if layer == 0 => DxFusion::None,
                    Some(bn) => DxFusion::BnSums { bn },
                    None => DxFusion::Dx,
                };
                Launch::ConvBackward { layer, fusion }
            }
            Layer::BatchNorm { .. } => Launch::BatchNormBackward { layer },
            Layer::Dropout { .. } => Launch::Dropout { layer },
            Layer::Relu if op.len() == 2 => Launch::ReluDropoutBackward { layer },
            Layer::Relu => Launch::ReluBackward { layer },
            ref pooling if pooling.is_pooling() => Launch::PoolBackward { layer },
            ref other => unreachable!("{other:?} alone in the backward pass"),
        }
    }

    /// Convolution `i` (or linear layer) as its forward launches see it.
    pub fn conv_layer(&self, model: &Model, i: usize) -> Option<ConvLayer> {
        let (d, w_off) = model.conv(i, self.n)?;
        Some(ConvLayer { d, w_off, bias: model.conv_bias(i), pool: self.plan.pooled_input[i] })
    }

    /// Convolution `i`'s gradients: where their slices go.
    pub fn conv_grad(&self, model: &Model, i: usize) -> Option<ConvGrad> {
        let l = self.conv_layer(model, i)?;
        let slices_of = |start: usize, len: usize| {
            let whole = SlicedGrad { start, len, extra: 0, slices: 1 };
            self.sliced.iter().find(|t| t.start == start).copied().unwrap_or(whole)
        };
        Some(ConvGrad {
            d: l.d,
            weights: slices_of(l.w_off, l.d.weight_len()),
            bias: l.bias.map(|b| slices_of(b, l.d.cout)),
            pool: l.pool,
        })
    }

    /// Batchnorm `i` as its launches see it: what it absorbs, and where its partials come from.
    pub fn bn_layer(&self, model: &Model, i: usize) -> Option<BnLayer> {
        let (&Layer::BatchNorm { c, .. }, LayerParams::BatchNorm { weight, bias, running_mean, running_var }) =
            (&model.layers[i], model.layer_params[i])
        else {
            return None;
        };
        let s = model.input_of(i);
        let f = self.plan.norm[i];
        let tiles_of = |conv: Option<usize>, output: bool| {
            let (d, _) = model.conv(conv?, self.n)?;
            Some(Conv::position_tiles(if output { d.n * d.ho() * d.wo() } else { d.n * d.h * d.w }))
        };
        Some(BnLayer {
            n: self.n,
            c,
            hw: s.h * s.w,
            relu: f.relu,
            offsets: BnOffsets {
                gamma: model.params[weight].offset,
                beta: model.params[bias].offset,
                running_mean: model.params[running_mean].offset,
                running_var: model.params[running_var].offset,
            },
            momentum: BN_MOMENTUM,
            eps: BN_EPS,
            spans: bn_spans(c),
            conv_forward_partials: tiles_of(self.stats_from[i], true),
            conv_backward_partials: tiles_of(self.sums_from[i], false),
            dy_pooled: f.avgpool,
            dropout: f.dropout.map(|(layer, p)| FusedDropout { p, layer }),
            maxpool: f.maxpool,
            width: s.w,
            parts: if i > 0 { self.splits[i - 1] } else { 1 },
        })
    }

    /// The layer an op is named after: the convolution of a max pooling read through, else its first.
    pub fn op_name(&self, model: &Model, op: &Op) -> String {
        model.layer_name(self.conv_of(model, op).unwrap_or(op.start))
    }
}

/// Which weight gradients are summed in slices, and where their extra slices go (after the trainable
/// prefix of the gradient buffer), in layer order; and the extra room they take. The slices depend
/// on the channels only, so every batch size of one model shares the gradient buffer's layout.
pub fn sliced_grads(model: &Model) -> (Vec<SlicedGrad>, usize) {
    let mut sliced = Vec::new();
    let mut extra = model.num_trainable;
    let mut add = |start: usize, len: usize, slices: usize| {
        if slices > 1 {
            sliced.push(SlicedGrad { start, len, extra, slices });
            extra += (slices - 1) * len;
        }
    };
    for i in 0..model.layers.len() {
        if let Some((d, w_off)) = model.conv(i, 1) {
            let bias = model.conv_bias(i);
            let slices = weight_grad_slices(&d, bias.is_some());
            add(w_off, d.weight_len(), slices);
            if let Some(b) = bias {
                add(b, d.cout, slices);
            }
        }
    }
    (sliced, extra - model.num_trainable)
}

/// The convolution that reads batchnorm `i`'s output in the backward pass (after the ReLU, dropout
/// and max pooling the batchnorm absorbs), whose dx epilogue then writes the batchnorm's backward sums.
fn conv_reading(model: &Model, plan: &Plan, i: usize) -> Option<usize> {
    let f = plan.norm[i];
    if f.avgpool {
        return None;
    }
    let next = i + 1 + f.relu as usize + f.dropout.is_some() as usize + f.maxpool as usize;
    let conv = matches!(model.layers.get(next), Some(Layer::Conv { .. }));
    (conv && plan.pooled_input[next] == f.maxpool).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast recipe's network: each ReLU's forward in the epilogue of the pooling or linear layer
    /// before it, its backward on its own.
    #[test]
    fn relus_without_a_batchnorm_run_in_the_forward_epilogue_before_them() {
        let text = include_str!("../../models/fast-recipe.toml");
        let m = crate::model::file::parse(text, "models/fast-recipe.toml", crate::model::MNIST_INPUT, 10).unwrap();
        let f = Fusion::new(&m, 100);
        let conv = |layer, fusion| Launch::ConvForward { layer, fusion };
        let plain = ForwardFusion::Plain { splits: 1 };
        let forward = vec![
            conv(0, plain),
            Launch::PoolRelu { layer: 1 },
            conv(3, plain),
            Launch::PoolRelu { layer: 4 },
            conv(6, ForwardFusion::Relu),
            conv(8, plain),
        ];
        assert_eq!(f.forward.iter().map(|(_, l)| *l).collect::<Vec<_>>(), forward);
        assert_eq!(f.eval.iter().map(|(_, l)| *l).collect::<Vec<_>>(), forward);
        let relus: Vec<Launch> =
            f.backward.iter().map(|(_, l)| *l).filter(|l| matches!(l, Launch::ReluBackward { .. })).collect();
        assert_eq!(relus, [7, 5, 2].map(|layer| Launch::ReluBackward { layer }));
    }

    /// A dropout right after such a ReLU runs in the same epilogue (forward) and with the ReLU's
    /// backward; evaluation leaves it out; one after a bare convolution runs alone.
    #[test]
    fn a_dropout_after_a_relu_epilogue_runs_in_it() {
        let text = include_str!("../../tests/fixtures/dropout_epilogues.toml");
        let m = crate::model::file::parse(text, "dropout_epilogues.toml", crate::model::MNIST_INPUT, 10).unwrap();
        let f = Fusion::new(&m, 8);
        let conv = |layer, fusion| Launch::ConvForward { layer, fusion };
        let plain = ForwardFusion::Plain { splits: 1 };
        let launches = |pass: &[(Op, Launch)]| pass.iter().map(|(_, l)| *l).collect::<Vec<_>>();
        let forward = vec![
            conv(0, ForwardFusion::ReluDropout { dropout: 2 }),
            Launch::PoolReluDropout { layer: 3 },
            conv(6, plain),
            Launch::Dropout { layer: 7 },
            Launch::PoolReluDropout { layer: 8 },
            conv(11, ForwardFusion::ReluDropout { dropout: 13 }),
            conv(14, plain),
        ];
        assert_eq!(launches(&f.forward), forward);
        let eval = [
            conv(0, ForwardFusion::Relu),
            Launch::PoolRelu { layer: 3 },
            conv(6, plain),
            Launch::PoolRelu { layer: 8 },
            conv(11, ForwardFusion::Relu),
            conv(14, plain),
        ];
        assert_eq!(launches(&f.eval), eval);
        let backward = launches(&f.backward);
        for relu in [12, 9, 4, 1] {
            assert!(backward.contains(&Launch::ReluDropoutBackward { layer: relu }), "{backward:?}");
        }
        assert!(backward.contains(&Launch::Dropout { layer: 7 }), "{backward:?}");
        // 7 forward, 11 backward: each dropout alone would have added 2.
        assert_eq!((f.forward.len(), f.backward.len()), (7, 11));
    }

    #[test]
    fn net3_fuses_every_batchnorm_into_its_convolutions() {
        let m = Model::net3();
        let f = Fusion::new(&m, 100);
        // conv1 | bn1 relu | conv2 | bn2 relu dropout | maxpool conv3 | ...: every batchnorm follows a
        // convolution; those of one part write its statistics.
        for (op, launch) in &f.forward {
            if let Launch::ConvForward { layer, fusion } = *launch {
                let bn = layer + 1;
                let want = if f.splits[layer] == 1 {
                    ForwardFusion::BnStats { bn }
                } else {
                    ForwardFusion::Plain { splits: f.splits[layer] }
                };
                assert_eq!(fusion, want, "{op:?}");
            }
        }
        assert!(f
            .eval
            .iter()
            .all(|(_, l)| matches!(l, Launch::ConvForward { fusion: ForwardFusion::BnEval { .. }, .. })));
        // The first convolution computes no dx; bn1..bn5's outputs are read by the next convolution.
        assert_eq!(f.backward.last().unwrap().1, Launch::ConvBackward { layer: 0, fusion: DxFusion::None });
        assert_eq!(f.sums_from[1], Some(3));
        assert_eq!(f.sums_from[4], Some(8));
        assert_eq!(f.sums_from[19], None);
        let bn2 = f.bn_layer(&m, 4).unwrap();
        assert!(bn2.relu && bn2.maxpool && bn2.dropout.is_some() && bn2.conv_backward_partials.is_some());
        assert!(f.bn_layer(&m, 0).is_none() && f.conv_layer(&m, 1).is_none());
    }
}
