// Batch normalization over (N, H, W) per channel, PyTorch semantics, with the ReLU that follows it
// fused in when d.relu == 1, and after that ReLU the training-mode dropout when d.dropout == 1 (its mask
// from dropout_hash as dropout.wgsl draws it, when s.dropout_on == 1). NCHW activations of d.hw pixels
// per plane, d.width per row.
// gamma, beta, running mean and variance live in `state` at the d.*_off offsets. `saved` holds the
// batch mean (c values), then 1 / sqrt(var + eps) (c values) of the last training-mode pass, then each
// slice's partial statistics (below).
//
// The sums over a channel's n * hw elements are cut into d.slices contiguous slices, so that few
// channels still fill a big GPU: one workgroup per (channel, slice) writes the slice's partial result,
// and the next kernel, which runs anyway, combines a channel's slices in slice order (so the same bits
// on every run): each of its workgroups first combines the few channels its elements belong to in
// workgroup memory (the host keeps slices * those planes within PARTS).
//
// Entry points and dispatch shapes:
//   stats            one workgroup per (channel, slice) (c * slices): the slice's mean and sum of squared
//                    deviations (two passes, fixed tree order) into saved[2c + 2 (slice c + channel)];
//                    with d.parts > 1, x arrives as that many parts (a convolution's split sums, part p
//                    at p * len(x)), which the first pass adds in order and writes back as x
//   apply_train      one invocation per element (n * c * hw): combines the slices (Chan's parallel
//                    variance, in slice order), y = (x - mean) * invstd * gamma + beta [, ReLU]; the
//                    workgroup holding a channel's first element also saves its mean and 1/std and
//                    updates its running statistics (unbiased variance)
//   apply_eval       one invocation per element: the same with the running statistics
//   backward_reduce  one workgroup per (channel, slice): the slice's dbeta = sum g and dgamma =
//                    sum g * xhat (g: dy masked by the ReLU, y > 0), slice 0 at the beta and gamma
//                    offsets of grads, slice s > 0 at d.beta_extra / d.gamma_extra + (s - 1) c (the
//                    SGD kernel adds them, as sgd.wgsl says)
//   backward_data    one invocation per element: adds the slices in order, then
//                    dx = gamma * invstd * (g - dbeta / m - xhat * dgamma / m)
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
    momentum: f32, eps: f32, slices: u32, gamma_extra: u32,
    beta_extra: u32, dy_pooled: u32, dropout: u32, dropout_threshold: u32,
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

// Slice s of a channel's n * hw elements: [start, end).
fn slice_range(s: u32) -> vec2<u32> {
    let m = d.n * d.hw;
    let share = (m + d.slices - 1u) / d.slices;
    return vec2<u32>(min(m, s * share), min(m, (s + 1u) * share));
}

@compute @workgroup_size(WG)
fn stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = flat_group(wid, nwg);
    // group is uniform across the workgroup, so this early exit keeps the barriers below uniform.
    if (group >= d.c * d.slices) {
        return;
    }
    let c = group % d.c;
    let slice = group / d.c;
    let r = slice_range(slice);
    let count = f32(max(r.y - r.x, 1u));
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
    let mean = workgroup_sum2(lid, sum, 0.0).x / count;
    var sq = 0.0;
    for (var j = r.x + lid; j < r.y; j += WG) {
        let v = x[element(c, j)] - mean;
        sq += v * v;
    }
    let m2 = workgroup_sum2(lid, sq, 0.0).x;
    if (lid == 0u) {
        let at = 2u * d.c + 2u * (slice * d.c + c);
        saved[at] = mean;
        saved[at + 1u] = m2;
    }
}

// Per (plane, slice) partials a workgroup loads, and per plane the combined values.
const PARTS: u32 = 2u * WG;
var<workgroup> part_a: array<f32, PARTS>;
var<workgroup> part_b: array<f32, PARTS>;
var<workgroup> plane_a: array<f32, WG>;
var<workgroup> plane_b: array<f32, WG>;

// The planes (image, channel) the workgroup starting at element `first` touches: the first one and
// how many.
fn planes_of(first: u32) -> vec2<u32> {
    let last = min(first + WG, d.n * d.c * d.hw) - 1u;
    return vec2<u32>(first / d.hw, last / d.hw - first / d.hw + 1u);
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
    let total = d.n * d.c * d.hw;
    let first = flat_group(wid, nwg) * WG;
    // Uniform across the workgroup: the barriers below stay in uniform control flow.
    if (first >= total) {
        return;
    }
    let planes = planes_of(first);
    // Part t is slice t % slices of plane t / slices.
    for (var t = lid; t < planes.y * d.slices; t += WG) {
        let at = 2u * d.c + 2u * ((t % d.slices) * d.c + (planes.x + t / d.slices) % d.c);
        part_a[t] = saved[at];
        part_b[t] = saved[at + 1u];
    }
    workgroupBarrier();
    if (lid < planes.y) {
        let plane = planes.x + lid;
        let c = plane % d.c;
        // Chan et al.'s combination of (count, mean, M2), slice by slice in order.
        var count = 0.0;
        var mean = 0.0;
        var m2 = 0.0;
        for (var t = 0u; t < d.slices; t++) {
            let r = slice_range(t);
            let nb = f32(r.y - r.x);
            if (nb > 0.0) {
                let delta = part_a[lid * d.slices + t] - mean;
                let both = count + nb;
                mean = mean + delta * (nb / both);
                m2 = m2 + part_b[lid * d.slices + t] + delta * delta * (count * nb / both);
                count = both;
            }
        }
        let m = d.n * d.hw;
        let var_biased = m2 / f32(m);
        let invstd = 1.0 / sqrt(var_biased + d.eps);
        plane_a[lid] = mean;
        plane_b[lid] = invstd;
        // Image 0's plane of the channel starts in this workgroup: save and update, once per channel.
        if (plane < d.c && plane * d.hw >= first) {
            saved[c] = mean;
            saved[d.c + c] = invstd;
            let unbiased = var_biased * f32(m) / f32(max(m, 2u) - 1u);
            state[d.mean_off + c] = (1.0 - d.momentum) * state[d.mean_off + c] + d.momentum * mean;
            state[d.var_off + c] = (1.0 - d.momentum) * state[d.var_off + c] + d.momentum * unbiased;
        }
    }
    workgroupBarrier();
    let i = first + lid;
    if (i < total) {
        let k2 = i / d.hw - planes.x;
        let v = normalize(i, (i / d.hw) % d.c, plane_a[k2], plane_b[k2]);
        if (dropping()) {
            out[i] = select(0.0, v * d.dropout_scale, dropout_hash(s.seed, s.step, d.dropout_layer, i) >= d.dropout_threshold);
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
// off or the dropout dropped (y == 0 in both cases), scaled as the dropout scaled.
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

// Where slice s of channel c's dbeta (or, with `gamma`, dgamma) goes in grads.
fn reduce_slot(s: u32, c: u32, gamma: bool) -> u32 {
    if (s == 0u) {
        return select(d.beta_off, d.gamma_off, gamma) + c;
    }
    return select(d.beta_extra, d.gamma_extra, gamma) + (s - 1u) * d.c + c;
}

@compute @workgroup_size(WG)
fn backward_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = flat_group(wid, nwg);
    if (group >= d.c * d.slices) {
        return;
    }
    let c = group % d.c;
    let slice = group / d.c;
    let r = slice_range(slice);
    let mean = saved[c];
    let invstd = saved[d.c + c];
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = r.x + lid; j < r.y; j += WG) {
        let i = element(c, j);
        let g = masked_dy(i);
        sg += g;
        sgx += g * (x[i] - mean) * invstd;
    }
    let total = workgroup_sum2(lid, sg, sgx);
    if (lid == 0u) {
        grads[reduce_slot(slice, c, false)] = total.x;
        grads[reduce_slot(slice, c, true)] = total.y;
    }
}

@compute @workgroup_size(WG)
fn backward_data(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let total = d.n * d.c * d.hw;
    let first = flat_group(wid, nwg) * WG;
    if (first >= total) {
        return;
    }
    let planes = planes_of(first);
    for (var t = lid; t < planes.y * d.slices; t += WG) {
        let c = (planes.x + t / d.slices) % d.c;
        part_a[t] = grads[reduce_slot(t % d.slices, c, false)];
        part_b[t] = grads[reduce_slot(t % d.slices, c, true)];
    }
    workgroupBarrier();
    if (lid < planes.y) {
        // The slices added in order, as the SGD kernel adds them.
        var dbeta = part_a[lid * d.slices];
        var dgamma = part_b[lid * d.slices];
        for (var t = 1u; t < d.slices; t++) {
            dbeta += part_a[lid * d.slices + t];
            dgamma += part_b[lid * d.slices + t];
        }
        plane_a[lid] = dbeta;
        plane_b[lid] = dgamma;
    }
    workgroupBarrier();
    let i = first + lid;
    if (i >= total) {
        return;
    }
    let c = (i / d.hw) % d.c;
    let k2 = i / d.hw - planes.x;
    let m = f32(d.n * d.hw);
    let mean = saved[c];
    let invstd = saved[d.c + c];
    let xhat = (x[i] - mean) * invstd;
    let scale = state[d.gamma_off + c] * invstd;
    out[i] = scale * (masked_dy(i) - plane_a[k2] / m - xhat * plane_b[k2] / m);
}
