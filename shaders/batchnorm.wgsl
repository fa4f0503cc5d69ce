// Batch normalization over (N, H, W) per channel, PyTorch semantics, with the ReLU that follows it
// fused in when d.relu == 1. NCHW activations of d.hw pixels per plane.
// gamma, beta, running mean and variance live in `state` at the d.*_off offsets; dgamma and dbeta are
// written to `grads` at the gamma and beta offsets. `saved` holds the batch mean (c values) then
// 1 / sqrt(var + eps) (c values) of the last training-mode pass.
//
// Entry points and dispatch shapes:
//   stats            one workgroup per channel (c): batch mean and biased variance (two passes, fixed
//                    tree order), saved, and the running statistics update (unbiased variance)
//   apply_train      one invocation per element (n * c * hw): y = (x - mean) * invstd * gamma + beta [, ReLU]
//   apply_eval       one invocation per element: the same with the running statistics
//   backward_reduce  one workgroup per channel: dbeta = sum g, dgamma = sum g * xhat, where g is dy
//                    masked by the ReLU (y > 0)
//   backward_data    one invocation per element: dx = gamma * invstd * (g - dbeta / m - xhat * dgamma / m)
// Bindings: 0 dims (uniform), 1 x (input of the layer), 2 state, 3 saved, 4 out (y or dx),
//           5 dy, 6 grads, 7 y (the layer's output, for the ReLU mask).

struct Dims {
    n: u32, c: u32, hw: u32, relu: u32,
    gamma_off: u32, beta_off: u32, mean_off: u32, var_off: u32,
    momentum: f32, eps: f32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> state: array<f32>;
@group(0) @binding(3) var<storage, read_write> saved: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> grads: array<f32>;
@group(0) @binding(7) var<storage, read> y: array<f32>;

fn element(c: u32, j: u32) -> u32 {
    // The j-th of the channel's n * hw elements, image by image.
    return ((j / d.hw) * d.c + c) * d.hw + j % d.hw;
}

@compute @workgroup_size(WG)
fn stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = flat_group(wid, nwg);
    if (c >= d.c) {
        return;
    }
    let m = d.n * d.hw;
    var sum = 0.0;
    for (var j = lid; j < m; j += WG) {
        sum += x[element(c, j)];
    }
    let mean = workgroup_sum2(lid, sum, 0.0).x / f32(m);
    var sq = 0.0;
    for (var j = lid; j < m; j += WG) {
        let v = x[element(c, j)] - mean;
        sq += v * v;
    }
    let var_biased = workgroup_sum2(lid, sq, 0.0).x / f32(m);
    if (lid == 0u) {
        saved[c] = mean;
        saved[d.c + c] = 1.0 / sqrt(var_biased + d.eps);
        let unbiased = var_biased * f32(m) / f32(max(m, 2u) - 1u);
        state[d.mean_off + c] = (1.0 - d.momentum) * state[d.mean_off + c] + d.momentum * mean;
        state[d.var_off + c] = (1.0 - d.momentum) * state[d.var_off + c] + d.momentum * unbiased;
    }
}

fn normalize(i: u32, c: u32, mean: f32, invstd: f32) {
    var v = (x[i] - mean) * invstd * state[d.gamma_off + c] + state[d.beta_off + c];
    if (d.relu == 1u) {
        v = max(v, 0.0);
    }
    out[i] = v;
}

@compute @workgroup_size(WG)
fn apply_train(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.n * d.c * d.hw) {
        return;
    }
    let c = (i / d.hw) % d.c;
    normalize(i, c, saved[c], saved[d.c + c]);
}

@compute @workgroup_size(WG)
fn apply_eval(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.n * d.c * d.hw) {
        return;
    }
    let c = (i / d.hw) % d.c;
    normalize(i, c, state[d.mean_off + c], 1.0 / sqrt(state[d.var_off + c] + d.eps));
}

// The gradient reaching the normalization: dy, zeroed where the fused ReLU was off.
fn masked_dy(i: u32) -> f32 {
    if (d.relu == 1u && y[i] <= 0.0) {
        return 0.0;
    }
    return dy[i];
}

@compute @workgroup_size(WG)
fn backward_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = flat_group(wid, nwg);
    if (c >= d.c) {
        return;
    }
    let mean = saved[c];
    let invstd = saved[d.c + c];
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = lid; j < d.n * d.hw; j += WG) {
        let i = element(c, j);
        let g = masked_dy(i);
        sg += g;
        sgx += g * (x[i] - mean) * invstd;
    }
    let total = workgroup_sum2(lid, sg, sgx);
    if (lid == 0u) {
        grads[d.beta_off + c] = total.x;
        grads[d.gamma_off + c] = total.y;
    }
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.n * d.c * d.hw) {
        return;
    }
    let c = (i / d.hw) % d.c;
    let m = f32(d.n * d.hw);
    let mean = saved[c];
    let invstd = saved[d.c + c];
    let xhat = (x[i] - mean) * invstd;
    let k = state[d.gamma_off + c] * invstd;
    out[i] = k * (masked_dy(i) - grads[d.beta_off + c] / m - xhat * grads[d.gamma_off + c] / m);
}
