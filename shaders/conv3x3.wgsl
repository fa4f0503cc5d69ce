// Convolution 3x3, stride 1, padding d.pad (0 or 1), no bias; NCHW activations, weights at
// state[d.w_off..] as cout x cin x 3 x 3 (their gradient at the same offset of grads).
//
// Entry points and dispatch shapes:
//   forward          one invocation per output pixel and block of CB output channels
//                    (n * ceil(cout / CB) * ho * wo), grid of WG-wide groups
//   backward_data    one invocation per input pixel and block of CB input channels (n * ceil(cin / CB) * h * w)
//   backward_weight  one workgroup per (co, ci) pair and slice (cout * cin * d.slices): slice s sums
//                    the 9 taps over its contiguous share of the (n, oy, ox) positions, WG invocations
//                    in a fixed order, and writes its partial sums to slice s's place (slice 0 at the
//                    weights' own offset of grads, slice s > 0 at d.extra_off + (s - 1) * weights);
//                    sgd.wgsl adds the slices in order. Few (co, ci) pairs still fill a big GPU.
// Bindings: 0 dims (uniform), 1 x (input activation), 2 state (weights), 3 dy (output gradient),
//           4 out (forward: y; backward_data: dx), 5 grads.

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

// Channels per invocation in forward (output channels) and backward_data (input channels): each
// activation value loaded feeds CB multiply-adds.
const CB: u32 = 4u;

// The weight of tap `tap` (0..8) for channels (co, ci), clamped into the tensor for the channels past
// the end of a partial block (their results are not written).
fn weight(co: u32, ci: u32, tap: u32) -> f32 {
    return state[d.w_off + (min(co, d.cout - 1u) * d.cin + min(ci, d.cin - 1u)) * 9u + tap];
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    let blocks = (d.cout + CB - 1u) / CB;
    if (i >= d.n * blocks * d.ho * d.wo) {
        return;
    }
    let ox = i % d.wo;
    let oy = (i / d.wo) % d.ho;
    let co = ((i / (d.wo * d.ho)) % blocks) * CB;
    let b = i / (d.wo * d.ho * blocks);
    var acc = vec4<f32>(0.0);
    for (var ci = 0u; ci < d.cin; ci++) {
        let plane = (b * d.cin + ci) * d.h;
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
                let v = x[(plane + u32(iy)) * d.w + u32(ix)];
                let tap = ky * 3u + kx;
                acc += v * vec4<f32>(weight(co, ci, tap), weight(co + 1u, ci, tap), weight(co + 2u, ci, tap), weight(co + 3u, ci, tap));
            }
        }
    }
    for (var t = 0u; t < CB; t++) {
        if (co + t < d.cout) {
            out[((b * d.cout + co + t) * d.ho + oy) * d.wo + ox] = acc[t];
        }
    }
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    let blocks = (d.cin + CB - 1u) / CB;
    if (i >= d.n * blocks * d.h * d.w) {
        return;
    }
    let ix = i % d.w;
    let iy = (i / d.w) % d.h;
    let ci = ((i / (d.w * d.h)) % blocks) * CB;
    let b = i / (d.w * d.h * blocks);
    var acc = vec4<f32>(0.0);
    for (var co = 0u; co < d.cout; co++) {
        let plane = (b * d.cout + co) * d.ho;
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
                let g = dy[(plane + u32(oy)) * d.wo + u32(ox)];
                let tap = ky * 3u + kx;
                acc += g * vec4<f32>(weight(co, ci, tap), weight(co, ci + 1u, tap), weight(co, ci + 2u, tap), weight(co, ci + 3u, tap));
            }
        }
    }
    for (var t = 0u; t < CB; t++) {
        if (ci + t < d.cin) {
            out[((b * d.cin + ci + t) * d.h + iy) * d.w + ix] = acc[t];
        }
    }
}

@compute @workgroup_size(WG)
fn backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // One workgroup per (co, ci) and slice computes all 9 taps: each dy value is loaded once for 9
    // products.
    let group = flat_group(wid, nwg);
    let pairs = d.cout * d.cin;
    // group is uniform across the workgroup, so this early exit keeps the barriers below uniform.
    if (group >= pairs * d.slices) {
        return;
    }
    let pair = group % pairs;
    let slice = group / pairs;
    let ci = pair % d.cin;
    let co = pair / d.cin;
    let per_image = d.ho * d.wo;
    let share = (d.n * per_image + d.slices - 1u) / d.slices;
    let end = min(d.n * per_image, (slice + 1u) * share);
    var acc: array<f32, 9>;
    for (var j = slice * share + lid; j < end; j += WG) {
        let b = j / per_image;
        let oy = (j % per_image) / d.wo;
        let ox = j % d.wo;
        let g = dy[(b * d.cout + co) * per_image + j % per_image];
        let plane = (b * d.cin + ci) * d.h;
        for (var ky = 0u; ky < 3u; ky++) {
            let iy = i32(oy + ky) - i32(d.pad);
            if (iy < 0 || iy >= i32(d.h)) {
                continue;
            }
            for (var kx = 0u; kx < 3u; kx++) {
                let ix = i32(ox + kx) - i32(d.pad);
                if (ix >= 0 && ix < i32(d.w)) {
                    acc[ky * 3u + kx] += g * x[(plane + u32(iy)) * d.w + u32(ix)];
                }
            }
        }
    }
    let base = select(d.extra_off + (slice - 1u) * pairs * 9u, d.w_off, slice == 0u) + pair * 9u;
    for (var t = 0u; t < 9u; t += 2u) {
        let second = select(0.0, acc[min(t + 1u, 8u)], t + 1u < 9u);
        let total = workgroup_sum2(lid, acc[t], second);
        if (lid == 0u) {
            grads[base + t] = total.x;
            if (t + 1u < 9u) {
                grads[base + t + 1u] = total.y;
            }
        }
    }
}
