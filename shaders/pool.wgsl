// Max and average pooling 2x2 with stride 2 (even sizes), and global average pooling; NCHW,
// d.planes = n * c planes of d.h x d.w inputs.
//
// Entry points and dispatch shapes:
//   maxpool_forward   one invocation per output (planes * h/2 * w/2): the maximum of its window
//   maxpool_backward  one invocation per output: finds its window's maximum in x again (the first on
//                     ties, window_max_place) and writes the whole window of dx (windows do not overlap)
//   avgpool2_forward  one invocation per output: its window's four values added in row-major order,
//                     then divided by 4 (as the CPU reference and PyTorch)
//   avgpool2_backward one invocation per output: dy / 4 into each place of its window of dx
//   maxpool_forward_relu, avgpool2_forward_relu
//                     the forward, then the ReLU that follows it (one no batchnorm absorbs): that
//                     launch is skipped
//   maxpool_forward_relu_dropout, avgpool2_forward_relu_dropout
//                     the same, then the dropout right after that ReLU: output i kept when
//                     dropout_hash(seed, step, d.drop_layer, i) >= d.drop_threshold and scaled by
//                     d.drop_scale (the identity when s.dropout_on == 0), as dropout.wgsl
//   gap_forward       one invocation per plane: the mean of its h * w values, summed in order
//   gap_backward      one invocation per input element: dx = dy[plane] / (h * w)
// Bindings: 0 dims (uniform), 1 x (input; gap_backward: dy), 2 out (y or dx), 3 dy (maxpool_backward,
//           avgpool2_backward), 4 step (uniform; the *_relu_dropout entry points).

struct Dims {
    planes: u32, h: u32, w: u32, drop_layer: u32,
    drop_threshold: u32, drop_scale: f32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<uniform> s: Step;

// Number of max-pool outputs.
fn pooled() -> u32 {
    return d.planes * (d.h / 2u) * (d.w / 2u);
}

// The index of the top-left input of output i's 2x2 window; window place k (0..3, row-major) is at
// base + (k / 2) * d.w + k % 2.
fn window_base(i: u32) -> u32 {
    let wo = d.w / 2u;
    let ho = d.h / 2u;
    let ox = i % wo;
    let oy = (i / wo) % ho;
    let p = i / (wo * ho);
    return (p * d.h + 2u * oy) * d.w + 2u * ox;
}

// Output i's window of x.
fn window(i: u32) -> vec4<f32> {
    let base = window_base(i);
    return vec4<f32>(x[base], x[base + 1u], x[base + d.w], x[base + d.w + 1u]);
}

@compute @workgroup_size(WG)
fn maxpool_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let v = window(i);
    out[i] = v[window_max_place(v)];
}

@compute @workgroup_size(WG)
fn maxpool_forward_relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let v = window(i);
    out[i] = relu(v[window_max_place(v)]);
}

// Output i of value v through the dropout that follows (after the ReLU).
fn dropped(i: u32, v: f32) -> f32 {
    if (s.dropout_on == 0u) {
        return v;
    }
    let keep = dropout_hash(s.dropout_seed, s.dropout_step, d.drop_layer, i) >= d.drop_threshold;
    return select(0.0, v * d.drop_scale, keep);
}

@compute @workgroup_size(WG)
fn maxpool_forward_relu_dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let v = window(i);
    out[i] = dropped(i, relu(v[window_max_place(v)]));
}

@compute @workgroup_size(WG)
fn maxpool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let base = window_base(i);
    let at = window_max_place(window(i));
    for (var k = 0u; k < 4u; k++) {
        out[base + (k / 2u) * d.w + k % 2u] = select(0.0, dy[i], k == at);
    }
}

@compute @workgroup_size(WG)
fn avgpool2_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let v = window(i);
    out[i] = (((v.x + v.y) + v.z) + v.w) / 4.0;
}

@compute @workgroup_size(WG)
fn avgpool2_forward_relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let v = window(i);
    out[i] = relu((((v.x + v.y) + v.z) + v.w) / 4.0);
}

@compute @workgroup_size(WG)
fn avgpool2_forward_relu_dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let v = window(i);
    out[i] = dropped(i, relu((((v.x + v.y) + v.z) + v.w) / 4.0));
}

@compute @workgroup_size(WG)
fn avgpool2_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= pooled()) {
        return;
    }
    let base = window_base(i);
    let g = dy[i] / 4.0;
    for (var k = 0u; k < 4u; k++) {
        out[base + (k / 2u) * d.w + k % 2u] = g;
    }
}

@compute @workgroup_size(WG)
fn gap_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let p = flat_index(gid, nwg);
    if (p >= d.planes) {
        return;
    }
    let hw = d.h * d.w;
    var sum = 0.0;
    for (var j = 0u; j < hw; j++) {
        sum += x[p * hw + j];
    }
    out[p] = sum / f32(hw);
}

@compute @workgroup_size(WG)
fn gap_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    let hw = d.h * d.w;
    if (i >= d.planes * hw) {
        return;
    }
    out[i] = x[i / hw] / f32(hw);
}
