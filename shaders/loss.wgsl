// Softmax cross-entropy over d.n images of d.classes logits: the gradient of the mean loss, and the
// sums of the loss and of the correct argmaxes (the first maximum on ties).
//
// Entry point and dispatch shape:
//   softmax_cross_entropy  one workgroup of WG invocations; invocation t takes images t, t + WG, ...
//                          and the two sums are reduced in a fixed tree order. metrics[0] += loss sum,
//                          metrics[1] += correct count when d.accumulate == 1, else they are overwritten.
// Bindings: 0 dims (uniform), 1 logits, 2 labels (u32), 3 dlogits, 4 metrics.

struct Dims {
    n: u32, classes: u32, accumulate: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> metrics: array<f32>;

@compute @workgroup_size(WG)
fn softmax_cross_entropy(@builtin(local_invocation_index) lid: u32) {
    var loss = 0.0;
    var correct = 0.0;
    for (var b = lid; b < d.n; b += WG) {
        let row = b * d.classes;
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
