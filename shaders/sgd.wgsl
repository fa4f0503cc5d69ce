// The recipe's SGD update over the trainable prefix of the flat state buffer, PyTorch semantics:
// g = grad + weight_decay * p; buf = momentum * buf + g; p -= lr * buf. lr and momentum come per step.
//
// An updated parameter or momentum that is not finite sets the metrics buffer's flag word (an integer
// atomic, so deterministic), so a diverging run is noticed even where later kernels hide the NaN.
//
// Entry point and dispatch shape:
//   update  one invocation per trainable parameter (d.len)
// Bindings: 0 dims (uniform), 1 step (uniform), 2 state, 3 grads, 4 momenta, 5 metrics (as words:
// loss sum, correct count, non-finite flag, unused).

struct Dims {
    len: u32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<uniform> s: Step;
@group(0) @binding(2) var<storage, read_write> state: array<f32>;
@group(0) @binding(3) var<storage, read> grads: array<f32>;
@group(0) @binding(4) var<storage, read_write> momenta: array<f32>;
@group(0) @binding(5) var<storage, read_write> metrics: array<atomic<u32>>;

// By the bits, which no compiler's assumption of finite arithmetic can fold away.
fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(WG)
fn update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= d.len) {
        return;
    }
    let g = grads[i] + s.weight_decay * state[i];
    let buf = s.momentum * momenta[i] + g;
    let p = state[i] - s.lr * buf;
    momenta[i] = buf;
    state[i] = p;
    if (!is_finite(p) || !is_finite(buf)) {
        atomicMax(&metrics[2], 1u);
    }
}
