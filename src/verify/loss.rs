//! The softmax cross-entropy kernel, with a global average pooling fused in or not.

use crate::cpu::reference::loss::softmax_cross_entropy;
use crate::cpu::reference::pool::*;
use crate::gpu::kernel::run;
use crate::gpu::loss::LossBuffers;
use crate::gpu::{GpuContext, Kernels};
use anyhow::Result;

use super::check::{compare, compare_exact, random, read, Check, TOL_SUMS};

/// The loss kernel on `n` images of `classes` logits; with `pool_hw` > 0, from a global average
/// pooling of `pool_hw` values per logit fused in (its logits written out and checked too).
pub(super) async fn loss_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    (n, classes, pool_hw): (usize, usize, usize),
    seed: u64,
) -> Result<Vec<Check>> {
    let pooled_input = random(seed + 1, n * classes * pool_hw.max(1), 4.0);
    let logits = if pool_hw > 0 {
        let mut l = vec![0.0; n * classes];
        global_avg_pool_forward(pool_hw, &pooled_input, &mut l);
        l
    } else {
        random(seed, n * classes, 4.0)
    };
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % classes) as u8).collect();
    let l32: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let (lb, lab, db, mb, pb) = (
        if pool_hw > 0 { ctx.zeros("logits", n * classes) } else { ctx.upload("logits", &logits) },
        ctx.upload("labels", &l32),
        ctx.zeros("dlogits", n * classes),
        ctx.zeros("metrics", 2),
        ctx.upload("pooled", &pooled_input),
    );
    let pooled = (pool_hw > 0).then_some((&pb, pool_hw));
    let buffers = LossBuffers { logits: &lb, labels: &lab, dlogits: &db, metrics: &mb, pooled };
    run(ctx, &[&k.loss.softmax_cross_entropy(ctx, n, classes, false, &buffers)]);
    let mut dlogits = vec![0.0; n * classes];
    let out = softmax_cross_entropy(&logits, &labels, classes, Some(&mut dlogits));
    let shape = if pool_hw > 0 { format!("{n}x{classes}x{pool_hw} pooled") } else { format!("{n}x{classes}") };
    let m = read(ctx, &mb, 2).await?;
    let got_logits = read(ctx, &lb, n * classes).await?;
    // Accumulating mode adds a second batch onto the first.
    run(ctx, &[&k.loss.softmax_cross_entropy(ctx, n, classes, true, &buffers)]);
    let m2 = read(ctx, &mb, 2).await?;
    let mut checks = vec![
        compare(
            "loss.softmax_cross_entropy (dlogits)",
            layer,
            &shape,
            &read(ctx, &db, n * classes).await?,
            &dlogits,
            TOL_SUMS,
        ),
        compare("loss.softmax_cross_entropy (loss)", layer, &shape, &[m[0] / n as f32], &[out.loss], TOL_SUMS),
        compare_exact("loss.softmax_cross_entropy (correct)", layer, &shape, "counts", &[m[1] as u32], &[out.correct]),
        compare_exact("loss.softmax_cross_entropy (accumulate)", layer, &shape, "sums", &m2, &[2.0 * m[0], 2.0 * m[1]]),
    ];
    if pool_hw > 0 {
        checks.push(compare(
            "loss.softmax_cross_entropy (pooled logits)",
            layer,
            &shape,
            &got_logits,
            &logits,
            TOL_SUMS,
        ));
    }
    Ok(checks)
}
