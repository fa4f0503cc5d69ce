// Softmax cross-entropy over d.n images of d.classes logits: the gradient of the mean loss, and the
// sums of the loss and of the correct argmaxes (the first maximum on ties). With d.pool_hw > 0 the
// global average pooling before it is fused in: each logit is first the mean of its d.pool_hw values of
// `pooled` (as pool.gap_forward computes it) and is written to `logits`.
//
// Entry point and dispatch shape:
//   softmax_cross_entropy  one workgroup of WG invocations; invocation t takes images t, t + WG, ...
//                          and the two sums are reduced in a fixed tree order. metrics[0] += loss sum,
//                          metrics[1] += correct count when d.accumulate == 1, else they are overwritten.
// Bindings: 0 dims (uniform), 1 logits, 2 labels (u32), 3 dlogits, 4 metrics, 5 pooled (the pooling's
// input; any read-only buffer when d.pool_hw == 0).

struct Dims {
    n: u32, classes: u32, accumulate: u32, pool_hw: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> metrics: array<f32>;
@group(0) @binding(5) var<storage, read> pooled: array<f32>;

@compute @workgroup_size(WG)
fn softmax_cross_entropy(@builtin(local_invocation_index) lid: u32) {
    var loss = 0.0;
    var correct = 0.0;
    for (var b = lid; b < d.n; b += WG) {
        let row = b * d.classes;
        if (d.pool_hw > 0u) {
            for (var j = 0u; j < d.classes; j++) {
                var sum = 0.0;
                for (var t = 0u; t < d.pool_hw; t++) {
                    sum += pooled[(row + j) * d.pool_hw + t];
                }
                logits[row + j] = sum / f32(d.pool_hw);
            }
        }
        let label = labels[b];
        var arg = 0u;
        for (var j = 1u; j < d.classes; j++) {
            if (logits[row + j] > logits[row + arg]) {
                arg = j;
            }
        }
        let top = logits[row + arg];
        var sum = 0.0;
        for (var j = 0u; j < d.classes; j++) {
            sum += exp(logits[row + j] - top);
        }
        let log_sum = log(sum) + top;
        loss += log_sum - logits[row + label];
        correct += select(0.0, 1.0, arg == label);
        for (var j = 0u; j < d.classes; j++) {
            let p = exp(logits[row + j] - log_sum);
            dlogits[row + j] = (p - select(0.0, 1.0, j == label)) / f32(d.n);
        }
    }
    let total = workgroup_sum2(lid, loss, correct);
    if (lid == 0u) {
        if (d.accumulate == 1u) {
            metrics[0] += total.x;
            metrics[1] += total.y;
        } else {
            metrics[0] = total.x;
            metrics[1] = total.y;
        }
    }
}
