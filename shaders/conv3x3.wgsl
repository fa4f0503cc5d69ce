// Convolution 3x3, stride 1, padding d.pad (0 or 1), no bias; NCHW activations, weights at
// state[d.w_off..] as cout x cin x 3 x 3 (their gradient at the same offset of grads).
//
// Entry points and dispatch shapes:
//   forward          one invocation per output element  (n * cout * ho * wo), grid of WG-wide groups
//   backward_data    one invocation per input element   (n * cin * h * w)
//   backward_weight  one workgroup per weight element   (cout * cin * 9), WG invocations summing over
//                    (n, oy, ox) in a fixed order
// Bindings: 0 dims (uniform), 1 x (input activation), 2 state (weights), 3 dy (output gradient),
//           4 out (forward: y; backward_data: dx), 5 grads.

struct Dims {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, ho: u32, wo: u32, pad: u32,
    w_off: u32, _p0: u32, _p1: u32, _p2: u32,
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
    if (i >= d.n * d.cout * d.ho * d.wo) {
        return;
    }
    let ox = i % d.wo;
    let oy = (i / d.wo) % d.ho;
    let co = (i / (d.wo * d.ho)) % d.cout;
    let b = i / (d.wo * d.ho * d.cout);
    var acc = 0.0;
    for (var ci = 0u; ci < d.cin; ci++) {
        let plane = (b * d.cin + ci) * d.h;
        let wbase = d.w_off + (co * d.cin + ci) * 9u;
        for (var ky = 0u; ky < 3u; ky++) {
            let iy = i32(oy + ky) - i32(d.pad);
            if (iy < 0 || iy >= i32(d.h)) {
                continue;
            }
            for (var kx = 0u; kx < 3u; kx++) {
                let ix = i32(ox + kx) - i32(d.pad);
                if (ix < 0 || ix >= i32(d.w)) {
                    continue;
                }
                acc += x[(plane + u32(iy)) * d.w + u32(ix)] * state[wbase + ky * 3u + kx];
            }
        }
    }
    out[i] = acc;
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.n * d.cin * d.h * d.w) {
        return;
    }
    let ix = i % d.w;
    let iy = (i / d.w) % d.h;
    let ci = (i / (d.w * d.h)) % d.cin;
    let b = i / (d.w * d.h * d.cin);
    var acc = 0.0;
    for (var co = 0u; co < d.cout; co++) {
        let plane = (b * d.cout + co) * d.ho;
        let wbase = d.w_off + (co * d.cin + ci) * 9u;
        for (var ky = 0u; ky < 3u; ky++) {
            let oy = i32(iy + d.pad) - i32(ky);
            if (oy < 0 || oy >= i32(d.ho)) {
                continue;
            }
            for (var kx = 0u; kx < 3u; kx++) {
                let ox = i32(ix + d.pad) - i32(kx);
                if (ox < 0 || ox >= i32(d.wo)) {
                    continue;
                }
                acc += dy[(plane + u32(oy)) * d.wo + u32(ox)] * state[wbase + ky * 3u + kx];
            }
        }
    }
    out[i] = acc;
}

@compute @workgroup_size(WG)
fn backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let k = flat_group(wid, nwg);
    let count = d.cout * d.cin * 9u;
    // k is uniform across the workgroup, so this early exit keeps the barriers below uniform.
    if (k >= count) {
        return;
    }
    let kx = k % 3u;
    let ky = (k / 3u) % 3u;
    let ci = (k / 9u) % d.cin;
    let co = k / (9u * d.cin);
    let per_image = d.ho * d.wo;
    var acc = 0.0;
    for (var j = lid; j < d.n * per_image; j += WG) {
        let b = j / per_image;
        let oy = (j % per_image) / d.wo;
        let ox = j % d.wo;
        let iy = i32(oy + ky) - i32(d.pad);
        let ix = i32(ox + kx) - i32(d.pad);
        if (iy >= 0 && iy < i32(d.h) && ix >= 0 && ix < i32(d.w)) {
            acc += dy[(b * d.cout + co) * per_image + oy * d.wo + ox]
                * x[((b * d.cin + ci) * d.h + u32(iy)) * d.w + u32(ix)];
        }
    }
    let total = workgroup_sum2(lid, acc, 0.0);
    if (lid == 0u) {
        grads[d.w_off + k] = total.x;
    }
}
