// Adam and AdamW over the trainable prefix of the flat state buffer, PyTorch's single-tensor semantics
// (torch.optim.Adam / AdamW), the gradient first finished from its slices. The step's scalars come in
// the step uniform, computed on the host as PyTorch computes them (src/optim.rs, AdamScalars):
//   g = grad + l2 * p                      (Adam's weight decay; l2 = 0 for AdamW)
//   p = p * decay                          (AdamW's: 1 - lr * weight_decay; 1 for Adam)
//   m = lerp(m, g, 1 - beta1)              (PyTorch's two-sided lerp)
//   v = beta2 * v + (1 - beta2) * g * g
//   p = p + (-step_size * m) / (sqrt(v) / bc2_sqrt + eps)
// update_common.wgsl is prepended: the shared bindings, the grid, `gradient` and `is_finite`.
//
// Entry point (dispatch shape: update_common.wgsl's, one invocation per trainable parameter):
//   update        the gradient finished, then the step (Adam or AdamW, as the scalars say)
// Bindings: update_common.wgsl's, and 4 moments (the first moments of the d.len parameters, then
// their second moments).

@group(0) @binding(4) var<storage, read_write> moments: array<f32>;

// PyTorch's lerp from a to b: its form depends on whether the weight is below one half.
fn torch_lerp(a: f32, b: f32, weight: f32) -> f32 {
    if (abs(weight) < 0.5) {
        return a + weight * (b - a);
    }
    return b - (b - a) * (1.0 - weight);
}

@compute @workgroup_size(UPDATE_WG)
fn update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = parameter_index(gid, nwg);
    if (i >= d.len) {
        return;
    }
    let grad = gradient(i);
    grads[i] = grad;
    let g = grad + s.adam_l2 * state[i];
    let m = torch_lerp(moments[i], g, s.adam_one_minus_beta1);
    let v = moments[d.len + i] * s.adam_beta2 + s.adam_one_minus_beta2 * g * g;
    let denom = sqrt(v) / s.adam_bc2_sqrt + s.adam_eps;
    let p = state[i] * s.adam_decay + (-s.adam_step_size * m) / denom;
    moments[i] = m;
    moments[d.len + i] = v;
    state[i] = p;
    if (!is_finite(p) || !is_finite(m) || !is_finite(v)) {
        atomicMax(&metrics[2], 1u);
    }
}
