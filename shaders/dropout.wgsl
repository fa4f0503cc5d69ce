// Dropout with masks drawn from a counter-based hash of (seed, step, element index), dropout_hash in
// common.wgsl, the same function as src/cpu/dropout.rs: element i is kept when hash >= d.threshold (= p * 2^24) and then scaled by
// d.scale (= 1 / (1 - p)). The forward and backward passes draw the same mask from the same step.
//
// Entry point and dispatch shape:
//   apply  one invocation per element (d.len): out = x * mask  (forward: x -> y; backward: dy -> dx)
// With s.dropout_on == 0 (the PyTorch fixture's steps) it is the identity.
// Bindings: 0 dims (uniform), 1 step (uniform: seed, step, dropout_on), 2 x, 3 out.

struct Dims {
    len: u32, threshold: u32, scale: f32, layer: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<uniform> s: Step;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.len) {
        return;
    }
    if (s.dropout_on == 0u) {
        out[i] = x[i];
        return;
    }
    let keep = dropout_hash(s.dropout_seed, s.dropout_step, d.layer, i) >= d.threshold;
    out[i] = select(0.0, x[i] * d.scale, keep);
}
