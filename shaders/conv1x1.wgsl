// Convolution 1x1 (a per-pixel matrix product), no bias, no padding; NCHW activations of d.h x d.w
// pixels per plane, weights at state[d.w_off..] as cout x cin (their gradient at the same offset of
// grads). The uniform is conv3x3.wgsl's (ho = h, wo = w, pad = 0 here), so one host launcher serves both.
//
// Entry points and dispatch shapes:
//   forward          one invocation per output element (n * cout * h * w)
//   backward_data    one invocation per input element  (n * cin * h * w)
//   backward_weight  one workgroup per weight element and slice (cout * cin * d.slices), WG
//                    invocations over the slice's contiguous share of (n, pixel); slices placed and
//                    added as in conv3x3.wgsl
// Bindings: 0 dims (uniform), 1 x, 2 state, 3 dy, 4 out (y or dx), 5 grads.

struct Dims {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, ho: u32, wo: u32, pad: u32,
    w_off: u32, slices: u32, extra_off: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> state: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> grads: array<f32>;

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.n * d.cout * (d.h * d.w)) {
        return;
    }
    let p = i % (d.h * d.w);
    let co = (i / (d.h * d.w)) % d.cout;
    let b = i / ((d.h * d.w) * d.cout);
    var acc = 0.0;
    for (var ci = 0u; ci < d.cin; ci++) {
        acc += x[(b * d.cin + ci) * (d.h * d.w) + p] * state[d.w_off + co * d.cin + ci];
    }
    out[i] = acc;
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.n * d.cin * (d.h * d.w)) {
        return;
    }
    let p = i % (d.h * d.w);
    let ci = (i / (d.h * d.w)) % d.cin;
    let b = i / ((d.h * d.w) * d.cin);
    var acc = 0.0;
    for (var co = 0u; co < d.cout; co++) {
        acc += dy[(b * d.cout + co) * (d.h * d.w) + p] * state[d.w_off + co * d.cin + ci];
    }
    out[i] = acc;
}

@compute @workgroup_size(WG)
fn backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = flat_group(wid, nwg);
    let pairs = d.cout * d.cin;
    if (group >= pairs * d.slices) {
        return;
    }
    let k = group % pairs;
    let slice = group / pairs;
    let ci = k % d.cin;
    let co = k / d.cin;
    let share = (d.n * (d.h * d.w) + d.slices - 1u) / d.slices;
    let end = min(d.n * (d.h * d.w), (slice + 1u) * share);
    var acc = 0.0;
    for (var j = slice * share + lid; j < end; j += WG) {
        let b = j / (d.h * d.w);
        let p = j % (d.h * d.w);
        acc += dy[(b * d.cout + co) * (d.h * d.w) + p] * x[(b * d.cin + ci) * (d.h * d.w) + p];
    }
    let total = workgroup_sum2(lid, acc, 0.0);
    if (lid == 0u) {
        grads[select(d.extra_off + (slice - 1u) * pairs, d.w_off, slice == 0u) + k] = total.x;
    }
}
