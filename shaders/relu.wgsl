// A ReLU on its own, where no neighbour's kernel absorbs it (a batchnorm's kernels run the ReLU right
// after it): y = max(x, 0) keeping a NaN (common.wgsl's relu), and dx = dy where the output is positive,
// else 0, as src/cpu/reference/relu.rs.
// A ReLU runs in place in training (its input's buffer), and where its input is another buffer (in
// evaluation after a skipped dropout, or on the network's input) from x into y.
//
// Entry points and dispatch shape (one invocation per element, d.len of them):
//   forward_in_place  y = relu(y)                   bindings: 0 dims, 1 y
//   forward           y = relu(x)                   bindings: 0 dims, 1 y, 2 x
//   backward          dx = select(0, dy, y > 0)     bindings: 0 dims, 2 y (the forward's output),
//                                                   3 dy, 4 dx
//   backward_dropout  the backward of this ReLU and of the dropout after it, which ran in the
//                     epilogue before them (conv.wgsl's forward_relu_dropout, pool.wgsl's
//                     *_relu_dropout): y is the dropout's output, 0 wherever the ReLU or the mask cut,
//                     so dx = select(0, dy * d.drop_scale, y > 0) (dy itself when s.dropout_on == 0),
//                     as a batchnorm reads its dropout's mask back; bindings: 0 dims, 2 y, 3 dy, 4 dx,
//                     5 step
// Bindings: 0 dims (uniform), 1 y (read_write), 2 x or y (read), 3 dy (read), 4 dx (read_write),
// 5 step (uniform).

struct Dims {
    len: u32, drop_scale: f32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;
@group(0) @binding(5) var<uniform> s: Step;

@compute @workgroup_size(WG)
fn forward_in_place(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i < d.len) {
        y[i] = relu(y[i]);
    }
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i < d.len) {
        y[i] = relu(x[i]);
    }
}

@compute @workgroup_size(WG)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i < d.len) {
        // x is the forward's output here: the gradient passes where it is positive.
        dx[i] = select(0.0, dy[i], x[i] > 0.0);
    }
}

@compute @workgroup_size(WG)
fn backward_dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i < d.len) {
        let scale = select(1.0, d.drop_scale, s.dropout_on == 1u);
        dx[i] = select(0.0, dy[i] * scale, x[i] > 0.0);
    }
}
