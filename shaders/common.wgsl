// Prepended to every shader of shaders/ by the host (src/gpu/kernel.rs) and by the naga test.
//
// Element-wise kernels run WG invocations per workgroup over a grid of (x, y) workgroups, because one
// dispatch dimension stops at 65,535 workgroups; `flat_index` turns that grid back into one index.
// Reduction kernels run one workgroup per output value and sum in a fixed tree order, so the same
// inputs give bitwise-identical results on every run (no float atomics anywhere).

const WG: u32 = 256u;

// What changes every training step (src/gpu/update.rs, StepUniform): the SGD hyper-parameters, the
// dropout masks' seed, step and on/off switch, and the Adam step's scalars (src/optim.rs, AdamScalars).
// Used by sgd.wgsl, adam.wgsl and dropout.wgsl.
struct Step {
    lr: f32, momentum: f32, weight_decay: f32, dropout_seed: u32,
    dropout_step: u32, dropout_on: u32, adam_one_minus_beta1: f32, adam_beta2: f32,
    adam_one_minus_beta2: f32, adam_eps: f32, adam_step_size: f32, adam_bc2_sqrt: f32,
    adam_l2: f32, adam_decay: f32, _p0: u32, _p1: u32,
}

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

var<workgroup> red_a: array<f32, WG>;
var<workgroup> red_b: array<f32, WG>;

// Sums (a, b) over the workgroup's invocations in a fixed tree order; every invocation gets the totals.
// Call from uniform control flow.
fn workgroup_sum2(lid: u32, a: f32, b: f32) -> vec2<f32> {
    red_a[lid] = a;
    red_b[lid] = b;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red_a[lid] += red_a[lid + s];
            red_b[lid] += red_b[lid + s];
        }
        workgroupBarrier();
    }
    let total = vec2<f32>(red_a[0], red_b[0]);
    workgroupBarrier();
    return total;
}

// The place (0..3, row-major) of the maximum of a 2x2 window's values, the first on ties (as PyTorch):
// the one rule of every kernel that pools or routes a pooling's gradient.
fn window_max_place(v: vec4<f32>) -> u32 {
    var at = 0u;
    var best = v.x;
    for (var k = 1u; k < 4u; k++) {
        if (v[k] > best) {
            best = v[k];
            at = k;
        }
    }
    return at;
}

// The dropout masks' counter-based hash of (seed, step, dropout layer, element index), as
// src/cpu/dropout.rs: element i is kept when its 24-bit draw is at least p * 2^24; the layer's index in
// the model makes each dropout layer draw its own mask. Used by dropout.wgsl and batchnorm.wgsl.
fn lowbias32(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

fn dropout_hash(seed: u32, step: u32, layer: u32, index: u32) -> u32 {
    return lowbias32(index + lowbias32(step + lowbias32(seed + lowbias32(layer)))) >> 8u;
}

// ReLU that keeps a NaN, as PyTorch's does (a max with 0 may turn it into 0 and hide a diverging run
// from its loss). The test is on the bits: WGSL lets a compiler assume that no float is NaN.
// Used by batchnorm.wgsl, conv.wgsl and relu.wgsl; src/cpu/reference/relu.rs does the same.
fn relu(v: f32) -> f32 {
    let nan = (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
    return select(max(v, 0.0), v, nan);
}
