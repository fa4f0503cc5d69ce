//! Launches shaders/conv.wgsl: convolutions of any kernel size as tiled implicit matrix products
//! (forward; backward: the weight gradient and dx in one launch), reading through a 2x2 max pooling
//! of their input when one precedes them. What a launch fuses is its epilogue (`ForwardEpilogue`,
//! `BackwardEpilogue`), and each epilogue is an entry point of its own.

use anyhow::{bail, Result};

use super::batchnorm::BnOffsets;
use super::context::GpuContext;
use super::dropout::FusedDropout;
use super::kernel::{compile, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;
use super::update::SlicedGrad;
use crate::model::ConvDims;

uniform! {
    #[derive(Default)]
    pub(super) struct Dims {
        n: u32,
        cin: u32,
        h: u32,
        w: u32,
        cout: u32,
        ho: u32,
        wo: u32,
        pad: u32,
        k: u32,
        w_off: u32,
        slices: u32,
        extra_off: u32,
        gamma_off: u32,
        beta_off: u32,
        mean_off: u32,
        var_off: u32,
        eps: f32,
        pool: u32,
        weight_groups: u32,
        splits: u32,
        bias: u32,
        bias_off: u32,
        bias_extra: u32,
        part_off: u32,
        bn_relu: u32,
        bn_dropout: u32,
        bn_scale: f32,
        drop_layer: u32,
        drop_threshold: u32,
        drop_scale: f32,
        _p0: u32,
        _p1: u32,
    }
}

/// A workgroup's tile in conv.wgsl: TP positions (or weight columns) by TC channels.
const TILE_POSITIONS: usize = 64;
const TILE_CHANNELS: usize = 16;

/// Workgroups a weight gradient's batch sum is spread over, at least, where its tiles are few: a big
/// GPU has over a hundred multiprocessors.
const WEIGHT_GRAD_GROUPS: usize = 256;
/// Slices of the positions per tile, at most (the SGD kernel adds every slice of every weight).
const MAX_WEIGHT_GRAD_SLICES: usize = 256;

/// The (channel, column) tiles of a convolution's weight gradient (a bias is one more column).
fn weight_grad_tiles(d: &ConvDims, bias: bool) -> usize {
    d.cout.div_ceil(TILE_CHANNELS) * (d.col_rows() + bias as usize).div_ceil(TILE_POSITIONS)
}

/// How many slices of the (image, position) sum a convolution's weight gradient is computed in (each
/// slice's partial sums written apart, then added in order by the SGD kernel): enough for
/// WEIGHT_GRAD_GROUPS workgroups. It depends on the channels only, so every batch size of one model
/// shares the gradient buffer's layout. A bias's gradient is computed with the weights', in as many
/// slices.
pub fn weight_grad_slices(d: &ConvDims, bias: bool) -> usize {
    WEIGHT_GRAD_GROUPS.div_ceil(weight_grad_tiles(d, bias)).clamp(1, MAX_WEIGHT_GRAD_SLICES)
}

/// Workgroups a forward launch should have, at least, where its tiles are few: then the sum's depth
/// is split (`forward_splits`).
const FORWARD_GROUPS: usize = 256;
/// Parts at most: each is a whole copy of the output.
const MAX_FORWARD_SPLITS: usize = 8;

/// How many parts a training forward's sum is split into so that the launch has FORWARD_GROUPS
/// workgroups (at least one row of the depth per part, at most MAX_FORWARD_SPLITS parts): 1 for
/// layers of enough tiles. The parts are written apart and added in order by the batchnorm
/// statistics that read them.
pub fn forward_splits(d: &ConvDims) -> usize {
    let tiles = Conv::output_tiles(d.cout, d.n * d.ho() * d.wo()) as usize;
    FORWARD_GROUPS.div_ceil(tiles).min(MAX_FORWARD_SPLITS).clamp(1, d.col_rows())
}

/// One convolution (or linear) layer as its launches see it: its geometry, where its weights and bias
/// lie in the state, and whether it reads its input through a 2x2 max pooling of x.
#[derive(Debug, Clone, Copy)]
pub struct ConvLayer {
    pub d: ConvDims,
    pub w_off: usize,
    pub bias: Option<usize>,
    pub pool: bool,
}

/// Where a convolution's gradients go: its weights' and bias's slices (see `weight_grad_slices`), and
/// whether it reads through a max pooling.
#[derive(Debug, Clone, Copy)]
pub struct ConvGrad {
    pub d: ConvDims,
    pub weights: SlicedGrad,
    pub bias: Option<SlicedGrad>,
    pub pool: bool,
}

/// The evaluation-mode batchnorm (and ReLU) fused into a forward launch.
#[derive(Debug, Clone, Copy)]
pub struct EvalBn {
    pub offsets: BnOffsets,
    pub eps: f32,
    pub relu: bool,
}

/// The training batchnorm whose partial sums a convolution's epilogue writes (see conv.wgsl): its
/// `saved` buffer and where the partials start in it. Forward: the batchnorm after the layer.
#[derive(Clone, Copy)]
pub struct BnStats<'a> {
    pub saved: &'a wgpu::Buffer,
    pub part_off: usize,
}

/// Backward: the batchnorm whose output (after its fused ReLU and dropout, and through the max pooling
/// the layer reads) is the layer's input, for the partial sums of its backward from dx.
#[derive(Clone, Copy)]
pub struct BnSums<'a> {
    pub saved: &'a wgpu::Buffer,
    pub part_off: usize,
    /// The batchnorm's input (x-hat's x).
    pub bn_x: &'a wgpu::Buffer,
    /// The step uniform (whether the dropout ran).
    pub step: &'a wgpu::Buffer,
    pub relu: bool,
    /// The fused dropout's probability.
    pub dropout: Option<f32>,
}

/// What a forward launch does after its tile product; each is an entry point of conv.wgsl.
#[derive(Clone, Copy)]
pub enum ForwardEpilogue<'a> {
    /// `forward`: y in `splits` parts (added up by the batchnorm statistics that follow).
    Plain { splits: usize },
    /// `forward_bn_stats`: y, and the partial statistics of the training batchnorm that follows.
    BnStats(BnStats<'a>),
    /// `forward_bn_eval`: the evaluation-mode batchnorm (and ReLU) of the next layer applied to y.
    BnEval(EvalBn),
    /// `forward_relu`: the ReLU of the next layer (one no batchnorm absorbs) applied to y.
    Relu,
    /// `forward_relu_dropout`: that ReLU, then the dropout after it (masks from the step uniform).
    ReluDropout(FusedDropout, &'a wgpu::Buffer),
}

/// What a backward launch computes besides the weight gradient; each is an entry point of conv.wgsl.
#[derive(Clone, Copy)]
pub enum BackwardEpilogue<'a> {
    /// `backward_weights`: nothing (the first layer's input needs no gradient).
    WeightsOnly,
    /// `backward`: dx into the buffer.
    Dx(&'a wgpu::Buffer),
    /// `backward_bn_sums`: dx, and the backward sums of the batchnorm whose output x is.
    DxBnSums(&'a wgpu::Buffer, BnSums<'a>),
}

/// The buffers a backward launch reads and writes besides dx.
#[derive(Clone, Copy)]
pub struct GradBuffers<'a> {
    pub x: &'a wgpu::Buffer,
    pub dy: &'a wgpu::Buffer,
    pub state: &'a wgpu::Buffer,
    pub grads: &'a wgpu::Buffer,
}

/// The kernels of shaders/conv.wgsl, one per fused variant.
pub struct Conv {
    forward: Kernel,
    forward_bn_stats: Kernel,
    forward_bn_eval: Kernel,
    forward_relu: Kernel,
    forward_relu_dropout: Kernel,
    backward: Kernel,
    backward_weights: Kernel,
    backward_bn_sums: Kernel,
}

impl Conv {
    pub fn new(ctx: &GpuContext) -> Result<Conv> {
        let mut k = compile(ctx, "conv")?;
        Ok(Conv {
            forward: take(&mut k, "forward"),
            forward_bn_stats: take(&mut k, "forward_bn_stats"),
            forward_bn_eval: take(&mut k, "forward_bn_eval"),
            forward_relu: take(&mut k, "forward_relu"),
            forward_relu_dropout: take(&mut k, "forward_relu_dropout"),
            backward: take(&mut k, "backward"),
            backward_weights: take(&mut k, "backward_weights"),
            backward_bn_sums: take(&mut k, "backward_bn_sums"),
        })
    }

    /// Every pass of a convolution does the same multiply-adds and touches input, weights and output;
    /// with `pool` the input read is 4 times larger.
    fn cost(d: &ConvDims, pool: bool) -> Cost {
        let taps = d.cout * d.cin * d.k * d.k;
        let input = d.n * d.cin * d.h * d.w * if pool { 4 } else { 1 };
        Cost::new(2 * d.n * d.ho() * d.wo() * taps, input + taps + d.n * d.cout * d.ho() * d.wo())
    }

    /// The uniform; with `pool`, the input is the 2x2 max pooling of x (planes of 2h x 2w).
    fn dims(d: &ConvDims, w_off: usize, pool: bool) -> Result<Dims> {
        if d.k == 0 || d.pad >= d.k || d.ho() == 0 || d.wo() == 0 {
            bail!("no GPU kernel for a {0}x{0} convolution with padding {1} of {2}x{3} images", d.k, d.pad, d.h, d.w);
        }
        Ok(Dims {
            n: d.n as u32,
            cin: d.cin as u32,
            h: d.h as u32,
            w: d.w as u32,
            cout: d.cout as u32,
            ho: d.ho() as u32,
            wo: d.wo() as u32,
            pad: d.pad as u32,
            k: d.k as u32,
            w_off: w_off as u32,
            slices: 1,
            splits: 1,
            pool: pool as u32,
            ..Default::default()
        })
    }

    /// Workgroups of an output-stationary pass: tiles of `channels` x `positions`.
    fn output_tiles(channels: usize, positions: usize) -> u32 {
        (channels.div_ceil(TILE_CHANNELS) * Conv::position_tiles(positions)) as u32
    }

    /// Tiles of positions of an output-stationary pass over `positions`: the partials per channel an
    /// epilogue writes.
    pub fn position_tiles(positions: usize) -> usize {
        positions.div_ceil(TILE_POSITIONS)
    }

    /// y = conv(x, the layer's weights) (+ its bias; with `pool`, of the 2x2 max pooling of x), then
    /// what `epilogue` says.
    pub fn forward(
        &self,
        ctx: &GpuContext,
        l: &ConvLayer,
        epilogue: ForwardEpilogue,
        x: &wgpu::Buffer,
        state: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let d = &l.d;
        let mut dims = Conv::dims(d, l.w_off, l.pool)?;
        if let Some(b) = l.bias {
            dims.bias = 1;
            dims.bias_off = b as u32;
        }
        let outputs = d.n * d.out_image();
        let mut cost = Conv::cost(d, l.pool);
        let (kernel, saved) = match epilogue {
            ForwardEpilogue::Plain { splits } => {
                if splits == 0 {
                    bail!("a convolution's forward sums in one part at least");
                }
                dims.splits = splits as u32;
                cost.bytes += 4.0 * ((splits - 1) * outputs) as f64;
                (&self.forward, None)
            }
            ForwardEpilogue::BnStats(st) => {
                dims.part_off = st.part_off as u32;
                // Two passes over each output, three values per tile and channel.
                cost.flops += 3.0 * outputs as f64;
                cost.bytes += 12.0 * (d.cout * Conv::position_tiles(d.n * d.ho() * d.wo())) as f64;
                (&self.forward_bn_stats, Some(st.saved))
            }
            ForwardEpilogue::BnEval(bn) => {
                dims.bn_relu = bn.relu as u32;
                dims.gamma_off = bn.offsets.gamma as u32;
                dims.beta_off = bn.offsets.beta as u32;
                dims.mean_off = bn.offsets.running_mean as u32;
                dims.var_off = bn.offsets.running_var as u32;
                dims.eps = bn.eps;
                cost.flops += 4.0 * outputs as f64;
                (&self.forward_bn_eval, None)
            }
            ForwardEpilogue::Relu => {
                cost.flops += outputs as f64;
                (&self.forward_relu, None)
            }
            ForwardEpilogue::ReluDropout(dropout, _) => {
                (dims.drop_threshold, dims.drop_scale) = super::dropout::mask_params(dropout.p);
                dims.drop_layer = dropout.layer as u32;
                // The ReLU, the hash and the scaling; y read back and written again.
                cost.flops += 3.0 * outputs as f64;
                cost.bytes += 8.0 * outputs as f64;
                (&self.forward_relu_dropout, None)
            }
        };
        let u = ctx.uniform("conv dims", &dims);
        let groups = Conv::output_tiles(d.cout, d.n * d.ho() * d.wo()) * dims.splits;
        let mut buffers = vec![(0, &u), (1, x), (2, state), (3, x), (4, y)];
        buffers.extend(saved.map(|s| (6, s)));
        if let ForwardEpilogue::ReluDropout(_, step) = epilogue {
            buffers.push((8, step));
        }
        Ok(kernel.launch(ctx, groups, &buffers).with_cost(cost))
    }

    /// The weight gradient from x (with `pool`, its 2x2 max pooling) and dy, in `g.weights.slices`
    /// partial sums (see `weight_grad_slices`) placed as `g.weights` says in `grads`, which the SGD
    /// kernel (or `Sgd::sum_slices`) adds, and the bias's gradient, if any, as `g.bias` says (as many
    /// slices); and in the same launch what `epilogue` says.
    pub fn backward(
        &self,
        ctx: &GpuContext,
        g: &ConvGrad,
        epilogue: BackwardEpilogue,
        b: &GradBuffers,
    ) -> Result<Dispatch> {
        let (d, sliced, bias) = (&g.d, &g.weights, g.bias.as_ref());
        if bias.is_some_and(|b| b.slices != sliced.slices || b.len != d.cout) {
            bail!("a bias's gradient goes in as many slices as its weights', one value per output channel");
        }
        let weight_groups = weight_grad_tiles(d, bias.is_some()) * sliced.slices;
        let mut dims = Dims {
            slices: sliced.slices as u32,
            extra_off: sliced.extra as u32,
            weight_groups: weight_groups as u32,
            bias: bias.is_some() as u32,
            bias_off: bias.map_or(0, |b| b.start as u32),
            bias_extra: bias.map_or(0, |b| b.extra as u32),
            ..Conv::dims(d, sliced.start, g.pool)?
        };
        let mut cost = Conv::cost(d, g.pool);
        cost.bytes += 4.0 * ((sliced.slices - 1) * sliced.len + bias.map_or(0, |b| b.slices * b.len)) as f64;
        let mut buffers = vec![(1, b.x), (2, b.state), (3, b.dy), (5, b.grads)];
        let (kernel, dx) = match epilogue {
            BackwardEpilogue::WeightsOnly => (&self.backward_weights, None),
            BackwardEpilogue::Dx(dx) => (&self.backward, Some(dx)),
            BackwardEpilogue::DxBnSums(dx, sums) => {
                dims.part_off = sums.part_off as u32;
                dims.bn_relu = sums.relu as u32;
                dims.bn_dropout = sums.dropout.is_some() as u32;
                dims.bn_scale = sums.dropout.map_or(1.0, |p| 1.0 / (1.0 - p));
                buffers.extend([(6, sums.saved), (7, sums.bn_x), (8, sums.step)]);
                // Per dx value: the mask and x-hat (reading y through the pooling, and the batchnorm's x).
                let inputs = d.n * d.cin * d.h * d.w;
                cost.flops += 6.0 * inputs as f64;
                cost.bytes += 4.0 * (inputs * if g.pool { 5 } else { 2 }) as f64;
                (&self.backward_bn_sums, Some(dx))
            }
        };
        let data_groups = match dx {
            Some(dx) => {
                buffers.push((4, dx));
                let data = Conv::cost(d, false);
                cost.flops += data.flops;
                cost.bytes += data.bytes;
                Conv::output_tiles(d.cin, d.n * d.h * d.w)
            }
            None => 0,
        };
        let u = ctx.uniform("conv dims", &dims);
        buffers.push((0, &u));
        Ok(kernel.launch(ctx, weight_groups as u32 + data_groups, &buffers).with_cost(cost))
    }
}
