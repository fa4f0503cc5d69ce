// The recipe's SGD update over the trainable prefix of the flat state buffer, PyTorch semantics:
// g = grad + weight_decay * p; buf = momentum * buf + g; p -= lr * buf. lr and momentum come per step.
// update_common.wgsl is prepended: the shared bindings, the grid, and `gradient`, which finishes the
// gradients summed in slices.
//
// Entry points (dispatch shape: update_common.wgsl's, one invocation per trainable parameter):
//   update        the gradient finished, then the step
//   sum_slices    the gradient finished only (when gradients are read without a step)
// Bindings: update_common.wgsl's, and 4 momenta.

@group(0) @binding(4) var<storage, read_write> momenta: array<f32>;

@compute @workgroup_size(UPDATE_WG)
fn update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = parameter_index(gid, nwg);
    if (i >= d.len) {
        return;
    }
    let grad = gradient(i);
    grads[i] = grad;
    let g = grad + s.weight_decay * state[i];
    let buf = s.momentum * momenta[i] + g;
    let p = state[i] - s.lr * buf;
    momenta[i] = buf;
    state[i] = p;
    if (!is_finite(p) || !is_finite(buf)) {
        atomicMax(&metrics[2], 1u);
    }
}

@compute @workgroup_size(UPDATE_WG)
fn sum_slices(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = parameter_index(gid, nwg);
    if (i < d.len) {
        grads[i] = gradient(i);
    }
}
