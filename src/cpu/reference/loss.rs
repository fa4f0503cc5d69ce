//! Softmax cross-entropy, mean over the batch, with its gradient and the count of correct argmaxes.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOut {
    /// Mean cross-entropy over the batch.
    pub loss: f32,
    /// Images whose largest logit (the first, on ties) is their label.
    pub correct: u32,
}

/// logits: n x classes. Writes d(mean loss)/d(logits) into `dlogits` when given.
pub fn softmax_cross_entropy(logits: &[f32], labels: &[u8], classes: usize, dlogits: Option<&mut [f32]>) -> LossOut {
    let n = labels.len();
    assert_eq!(logits.len(), n * classes);
    let mut total = 0.0f64;
    let mut correct = 0u32;
    let mut grad = dlogits;
    for (i, (row, &label)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        let argmax = argmax(row);
        correct += (argmax == label as usize) as u32;
        let max = row[argmax];
        let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
        let log_sum = sum.ln() + max;
        total += (log_sum - row[label as usize]) as f64;
        if let Some(g) = grad.as_deref_mut() {
            for (j, (o, &v)) in g[i * classes..(i + 1) * classes].iter_mut().zip(row).enumerate() {
                let p = (v - log_sum).exp();
                *o = (p - if j == label as usize { 1.0 } else { 0.0 }) / n as f32;
            }
        }
    }
    LossOut { loss: (total / n as f64) as f32, correct }
}

/// The index of the largest value, the first on ties (as every correct count here is made).
pub fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best })
}

/// The softmax of one row of logits, in f64 (from its largest value, so that no exp overflows).
pub fn softmax(row: &[f32]) -> Vec<f64> {
    let top = row[argmax(row)];
    let exp: Vec<f64> = row.iter().map(|&v| ((v - top) as f64).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}
