// Batch normalization over (N, H, W) per channel, PyTorch semantics, with the ReLU that follows it
// fused in when d.relu == 1, and after that ReLU the training-mode dropout when d.dropout == 1 (its mask
// from dropout_hash as dropout.wgsl draws it, when s.dropout_on == 1). NCHW activations of d.hw pixels
// per plane, d.width per row.
// gamma, beta, running mean and variance live in `state` at the d.*_off offsets. `saved` holds the
// batch mean (c values), then 1 / sqrt(var + eps) (c values) of the last training-mode pass, then the
// forward partials, then the backward partials (below).
//
// The sums over a channel's n * hw elements arrive as partial results, written by the launch before:
//   forward:  d.fpartials partials per channel, (count, mean, M2) at saved[2c + 3 (part c + channel)],
//             from the `stats` entry below or, when a convolution comes before, from its epilogue
//             (conv.wgsl, one per tile of positions), which saves a launch;
//   backward: d.bpartials partials per channel, (sum g, sum g * xhat) at
//             saved[2c + 3 c fpartials + 2 (part c + channel)], from `backward_reduce` or, when a
//             convolution reads this layer's output, from the epilogue of its dx.
// The kernels that need the totals run one workgroup per (channel, span) of the channel's elements:
// each combines its channel's partials in a fixed order (each invocation a strided run in part order,
// then a tree), so every workgroup and every run gets the same bits, then works through its span.
//
// Entry points and dispatch shapes (c * d.spans workgroups each, span s of channel c in workgroup
// s c + c):
//   stats            the span's (count, mean, M2) as forward partial s (two passes, fixed tree order);
//                    with d.parts > 1, x arrives as that many parts (a convolution's split sums, part p
//                    at p * len(x)), which the first pass adds in order and writes back as x
//   apply_train      combines the forward partials (Chan's parallel variance), then over the span
//                    y = (x - mean) * invstd * gamma + beta [, ReLU] [, dropout]; span 0 also saves
//                    the mean and 1/std and updates the running statistics (unbiased variance)
//   backward_reduce  the span's dbeta = sum g and dgamma = sum g * xhat (g: dy masked by the ReLU,
//                    y > 0) as backward partial s
//   backward_data    adds the backward partials, then over the span
//                    dx = gamma * invstd * (g - dbeta / m - xhat * dgamma / m); span 0 also writes
//                    dbeta and dgamma into grads at the beta and gamma offsets
//   apply_eval       one invocation per element (a flat grid of WG-wide workgroups): the normalization
//                    with the running statistics
// In the backward entries dy is the gradient of the layer's output (after ReLU and dropout), or, when
// d.dy_pooled == 1, of a global average pooling of it (one per plane), or, when d.maxpool == 1, of a
// 2x2 max pooling of it: the pooling's backward runs inside (the gradient goes to each window's
// maximum, found again in y). A fused dropout's mask needs no draw there: the output y is 0 exactly
// where the ReLU or the dropout cut the gradient, and the kept elements were scaled by d.dropout_scale.
// Bindings: 0 dims (uniform), 1 x (input of the layer), 2 state, 3 saved, 4 out (y or dx), 5 dy,
//           6 grads, 7 y (the layer's output, for the masks), 8 step (uniform: the dropout's draw).

struct Dims {
    n: u32, c: u32, hw: u32, relu: u32,
    gamma_off: u32, beta_off: u32, mean_off: u32, var_off: u32,
    momentum: f32, eps: f32, spans: u32, fpartials: u32,
    bpartials: u32, dy_pooled: u32, dropout: u32, dropout_threshold: u32,
    dropout_scale: f32, maxpool: u32, width: u32, parts: u32,
    dropout_layer: u32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> state: array<f32>;
@group(0) @binding(3) var<storage, read_write> saved: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> grads: array<f32>;
@group(0) @binding(7) var<storage, read> y: array<f32>;
@group(0) @binding(8) var<uniform> s: Step;

fn element(c: u32, j: u32) -> u32 {
    // The j-th of the channel's n * hw elements, image by image.
    return ((j / d.hw) * d.c + c) * d.hw + j % d.hw;
}

// Span s of a channel's n * hw elements: [start, end).
fn span_range(s: u32) -> vec2<u32> {
    let m = d.n * d.hw;
    let share = (m + d.spans - 1u) / d.spans;
    return vec2<u32>(min(m, s * share), min(m, (s + 1u) * share));
}

// The workgroup's channel and span; the second is d.spans past the end (nothing to do) for a
// workgroup the grid rounded up.
fn channel_span(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
    let group = flat_group(wid, nwg);
    if (group >= d.c * d.spans) {
        return vec2<u32>(0u, d.spans);
    }
    return vec2<u32>(group % d.c, group / d.c);
}

fn forward_partial(part: u32, c: u32) -> u32 {
    return 2u * d.c + 3u * (part * d.c + c);
}

fn backward_partial(part: u32, c: u32) -> u32 {
    return 2u * d.c + 3u * d.c * d.fpartials + 2u * (part * d.c + c);
}

// Chan et al.'s combination of two (count, mean, M2) summaries.
fn chan(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    if (b.x == 0.0) {
        return a;
    }
    if (a.x == 0.0) {
        return b;
    }
    let both = a.x + b.x;
    let delta = b.y - a.y;
    return vec3<f32>(both, a.y + delta * (b.x / both), a.z + b.z + delta * delta * (a.x * b.x / both));
}

var<workgroup> red_n: array<f32, WG>;

// Channel c's forward partials combined: count, mean, M2. The same order in every workgroup.
// Call from uniform control flow.
fn channel_stats(lid: u32, c: u32) -> vec3<f32> {
    var mine = vec3<f32>(0.0);
    for (var p = lid; p < d.fpartials; p += WG) {
        let at = forward_partial(p, c);
        mine = chan(mine, vec3<f32>(saved[at], saved[at + 1u], saved[at + 2u]));
    }
    red_n[lid] = mine.x;
    red_a[lid] = mine.y;
    red_b[lid] = mine.z;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let r = chan(vec3<f32>(red_n[lid], red_a[lid], red_b[lid]),
                         vec3<f32>(red_n[lid + s], red_a[lid + s], red_b[lid + s]));
            red_n[lid] = r.x;
            red_a[lid] = r.y;
            red_b[lid] = r.z;
        }
        workgroupBarrier();
    }
    let total = vec3<f32>(red_n[0], red_a[0], red_b[0]);
    workgroupBarrier();
    return total;
}

// Channel c's backward partials added: (dbeta, dgamma). The same order in every workgroup.
fn channel_sums(lid: u32, c: u32) -> vec2<f32> {
    var sg = 0.0;
    var sgx = 0.0;
    for (var p = lid; p < d.bpartials; p += WG) {
        let at = backward_partial(p, c);
        sg += saved[at];
        sgx += saved[at + 1u];
    }
    return workgroup_sum2(lid, sg, sgx);
}

@compute @workgroup_size(WG)
fn stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let cs = channel_span(wid, nwg);
    // Uniform across the workgroup, so this early exit keeps the barriers below uniform.
    if (cs.y >= d.spans) {
        return;
    }
    let c = cs.x;
    let r = span_range(cs.y);
    let count = f32(r.y - r.x);
    var sum = 0.0;
    for (var j = r.x + lid; j < r.y; j += WG) {
        let i = element(c, j);
        var v = x[i];
        if (d.parts > 1u) {
            // The convolution before wrote its output in parts (split sums): add them in order, once.
            let len = d.n * d.c * d.hw;
            for (var part = 1u; part < d.parts; part++) {
                v += x[part * len + i];
            }
            x[i] = v;
        }
        sum += v;
    }
    let mean = workgroup_sum2(lid, sum, 0.0).x / max(count, 1.0);
    var sq = 0.0;
    for (var j = r.x + lid; j < r.y; j += WG) {
        let v = x[element(c, j)] - mean;
        sq += v * v;
    }
    let m2 = workgroup_sum2(lid, sq, 0.0).x;
    if (lid == 0u) {
        let at = forward_partial(cs.y, c);
        saved[at] = count;
        saved[at + 1u] = mean;
        saved[at + 2u] = m2;
    }
}

fn normalize(i: u32, c: u32, mean: f32, invstd: f32) -> f32 {
    var v = (x[i] - mean) * invstd * state[d.gamma_off + c] + state[d.beta_off + c];
    if (d.relu == 1u) {
        v = relu(v);
    }
    return v;
}

// Whether the fused dropout scales the kept elements this step.
fn dropping() -> bool {
    return d.dropout == 1u && s.dropout_on == 1u;
}

@compute @workgroup_size(WG)
fn apply_train(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let cs = channel_span(wid, nwg);
    if (cs.y >= d.spans) {
        return;
    }
    let c = cs.x;
    let total = channel_stats(lid, c);
    let m = d.n * d.hw;
    let mean = total.y;
    let var_biased = total.z / f32(m);
    let invstd = 1.0 / sqrt(var_biased + d.eps);
    if (cs.y == 0u && lid == 0u) {
        saved[c] = mean;
        saved[d.c + c] = invstd;
        let unbiased = var_biased * f32(m) / f32(max(m, 2u) - 1u);
        state[d.mean_off + c] = (1.0 - d.momentum) * state[d.mean_off + c] + d.momentum * mean;
        state[d.var_off + c] = (1.0 - d.momentum) * state[d.var_off + c] + d.momentum * unbiased;
    }
    let r = span_range(cs.y);
    for (var j = r.x + lid; j < r.y; j += WG) {
        let i = element(c, j);
        let v = normalize(i, c, mean, invstd);
        if (dropping()) {
            out[i] = select(0.0, v * d.dropout_scale, dropout_hash(s.dropout_seed, s.dropout_step, d.dropout_layer, i) >= d.dropout_threshold);
        } else {
            out[i] = v;
        }
    }
}

@compute @workgroup_size(WG)
fn apply_eval(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.n * d.c * d.hw) {
        return;
    }
    let c = (i / d.hw) % d.c;
    out[i] = normalize(i, c, state[d.mean_off + c], 1.0 / sqrt(state[d.var_off + c] + d.eps));
}

// The gradient of output element i when a 2x2 max pooling follows: its window's, if i is the
// window's maximum (the first on ties, as the forward pooling chose), else 0.
fn maxpool_dy(i: u32) -> f32 {
    let plane = i / d.hw;
    let row = (i % d.hw) / d.width;
    let col = i % d.width;
    let pw = d.width / 2u;
    let ph = (d.hw / d.width) / 2u;
    if (row / 2u >= ph || col / 2u >= pw) {
        return 0.0;
    }
    let base = plane * d.hw + (row & ~1u) * d.width + (col & ~1u);
    let v = vec4<f32>(y[base], y[base + 1u], y[base + d.width], y[base + d.width + 1u]);
    if (window_max_place(v) != (row % 2u) * 2u + col % 2u) {
        return 0.0;
    }
    return dy[(plane * ph + row / 2u) * pw + col / 2u];
}

// The gradient reaching the normalization: dy through the poolings, zeroed where the fused ReLU was
// off or the dropout dropped (y == 0 in both cases), scaled as the dropout scaled. conv.wgsl's
// bn_gradient computes the same from a convolution's dx.
fn masked_dy(i: u32) -> f32 {
    if (d.relu == 1u && y[i] <= 0.0) {
        return 0.0;
    }
    var g: f32;
    if (d.dy_pooled == 1u) {
        // A global average pooling follows, its backward fused in (as pool.gap_backward computes it):
        // dy holds one gradient per plane.
        g = dy[i / d.hw] / f32(d.hw);
    } else if (d.maxpool == 1u) {
        g = maxpool_dy(i);
    } else {
        g = dy[i];
    }
    if (dropping()) {
        g *= d.dropout_scale;
    }
    return g;
}

@compute @workgroup_size(WG)
fn backward_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let cs = channel_span(wid, nwg);
    if (cs.y >= d.spans) {
        return;
    }
    let c = cs.x;
    let r = span_range(cs.y);
    let mean = saved[c];
    let invstd = saved[d.c + c];
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = r.x + lid; j < r.y; j += WG) {
        let i = element(c, j);
        let g = masked_dy(i);
        sg += g;
        sgx += g * ((x[i] - mean) * invstd);
    }
    let total = workgroup_sum2(lid, sg, sgx);
    if (lid == 0u) {
        let at = backward_partial(cs.y, c);
        saved[at] = total.x;
        saved[at + 1u] = total.y;
    }
}

@compute @workgroup_size(WG)
fn backward_data(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let cs = channel_span(wid, nwg);
    if (cs.y >= d.spans) {
        return;
    }
    let c = cs.x;
    let sums = channel_sums(lid, c);
    if (cs.y == 0u && lid == 0u) {
        grads[d.beta_off + c] = sums.x;
        grads[d.gamma_off + c] = sums.y;
    }
    let m = f32(d.n * d.hw);
    let mean = saved[c];
    let invstd = saved[d.c + c];
    let scale = state[d.gamma_off + c] * invstd;
    let r = span_range(cs.y);
    for (var j = r.x + lid; j < r.y; j += WG) {
        let i = element(c, j);
        let xhat = (x[i] - mean) * invstd;
        out[i] = scale * (masked_dy(i) - sums.x / m - xhat * sums.y / m);
    }
}
