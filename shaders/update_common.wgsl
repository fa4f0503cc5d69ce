// Prepended (after common.wgsl) by the host to the two updates, sgd.wgsl and adam.wgsl: their shared
// bindings, their flat grid, a parameter's whole gradient from the partial sums the convolutions leave
// (see conv.wgsl), and the finiteness test of an updated value.
//
// sliced[k] = (start, len, extra, slices) says that grads[start .. start + len] holds slice 0 of a
// tensor and grads[extra + (t - 1) * len ..] its slice t; sliced_of[i] is k + 1 for parameter i of
// tensor k, 0 for a parameter whose gradient is whole. The slices are added in order, so the sum is the
// same on every run.
//
// An updated value that is not finite sets the metrics buffer's flag word (an integer atomic, so
// deterministic), so a diverging run is noticed even where later kernels hide the NaN.
//
// Dispatch shape of every entry point: one invocation per trainable parameter (d.len), workgroups of
// UPDATE_WG, a flat grid (as flat_index but UPDATE_WG wide: narrow, so that Net3's 17,900 parameters
// still make 280 workgroups for a big GPU).
// Bindings: 0 dims (uniform), 1 step (uniform), 2 state, 3 grads, 5 metrics (as words: loss sum,
// correct count, non-finite flag, unused), 6 sliced, 7 sliced_of; binding 4 is each update's own.

struct Dims {
    len: u32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<uniform> s: Step;
@group(0) @binding(2) var<storage, read_write> state: array<f32>;
@group(0) @binding(3) var<storage, read_write> grads: array<f32>;
@group(0) @binding(5) var<storage, read_write> metrics: array<atomic<u32>>;
@group(0) @binding(6) var<storage, read> sliced: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> sliced_of: array<u32>;

// Invocations per workgroup (UPDATE_WORKGROUP in src/gpu/update.rs).
const UPDATE_WG: u32 = 64u;

fn parameter_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * UPDATE_WG;
}

// By the bits, which no compiler's assumption of finite arithmetic can fold away.
fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// Parameter i's whole gradient: its slices added in order (one slice: grads[i] as it is).
fn gradient(i: u32) -> f32 {
    var g = grads[i];
    let k = sliced_of[i];
    if (k > 0u) {
        let t = sliced[k - 1u];
        for (var slice = 1u; slice < t.w; slice++) {
            g += grads[t.z + (slice - 1u) * t.y + (i - t.x)];
        }
    }
    return g;
}
