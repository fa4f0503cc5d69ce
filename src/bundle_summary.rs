//! The table that ends `dist/run.sh` (`mnist-wgpu bundle-summary OUTDIR`), read from the files the run
//! left in OUTDIR (verify.json, bench.json, profile.json, metrics.jsonl, torch.jsonl) and the runner's
//! step log. A missing or broken file is reported in its row, never fatal: the summary of a run that
//! went wrong is the one most worth reading.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not JSON ({e})", path.display()))
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: a line is not JSON ({e})", path.display())))
        .collect()
}

/// 12345.6 -> "12,346".
fn thousands(v: f64) -> String {
    crate::model::group_thousands(v.round().max(0.0) as usize)
}

/// A row of the runs' table: its label, and how a run's figures print in it.
type Row<'a> = (&'a str, &'a dyn Fn(&RunFigures) -> String);

/// What one training run (ours or PyTorch's) achieved, from its per-epoch lines.
struct RunFigures {
    epochs: usize,
    wall_seconds: f64,
    final_accuracy: f64,
    best_accuracy: f64,
    /// (seconds since the start, epoch) when 99.0% and 99.4% were first reached.
    reached: [Option<(f64, usize)>; 2],
    median_images_per_sec: f64,
}

fn run_figures(epochs: &[Value]) -> Option<RunFigures> {
    let epochs: Vec<&Value> = epochs.iter().filter(|e| e.get("epoch").is_some()).collect();
    let last = epochs.last()?;
    let mut elapsed = 0.0;
    let mut reached = [None, None];
    let mut best: f64 = 0.0;
    let mut rates = Vec::new();
    for e in &epochs {
        elapsed += e["seconds"].as_f64().unwrap_or(0.0);
        let acc = e["test_accuracy"].as_f64().unwrap_or(0.0);
        best = best.max(acc);
        rates.push(e["train_images_per_sec"].as_f64().unwrap_or(0.0));
        let epoch = e["epoch"].as_u64().unwrap_or(0) as usize;
        for (slot, target) in reached.iter_mut().zip([99.0, 99.4]) {
            if slot.is_none() && acc >= target {
                *slot = Some((elapsed, epoch));
            }
        }
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    Some(RunFigures {
        epochs: epochs.len(),
        wall_seconds: elapsed,
        final_accuracy: last["test_accuracy"].as_f64().unwrap_or(0.0),
        best_accuracy: best,
        reached,
        median_images_per_sec: rates[rates.len() / 2],
    })
}

fn reached(r: Option<(f64, usize)>) -> String {
    r.map_or("not reached".into(), |(s, e)| format!("{s:.1} s (epoch {e})"))
}

/// A profile's figures in one line: launches per step, the step's kernels each timed alone, and the
/// step as one pass (where the profile has it: older builds' profiles do not).
fn profile_figures(v: &Value) -> String {
    let launches = v["dispatches_per_step"].as_u64().or_else(|| v["launches"].as_array().map(|l| l.len() as u64));
    let mut text = format!(
        "{} launches, {} us of kernels per step (each timed alone)",
        launches.map_or("?".into(), |n| n.to_string()),
        thousands(v["step_us"].as_f64().unwrap_or(0.0))
    );
    if let Some(us) = v["one_pass_us"].as_f64() {
        let _ = write!(text, ", {} us as one pass", thousands(us));
    }
    text
}

/// The summary table of the run in `dir`; `steps` is the runner's step log (one line per step,
/// tab-separated: name, exit status, seconds, limit); `baseline`, the profile of an older build run
/// beside this one (`gpu-bundle.sh --baseline`), and that build's revision.
pub fn render(dir: &Path, steps: Option<&Path>, baseline: Option<(&Path, &str)>) -> String {
    let log = StepLog::read(steps);
    let mut s = String::new();
    let _ = writeln!(s, "\n==== mnist-wgpu GPU run: summary ({}) ====", dir.display());
    verify_rows(&mut s, dir, &log);
    bench_rows(&mut s, dir, &log);
    let profile = read_json(&dir.join("profile.json"));
    profile_row(&mut s, &profile, &log);
    if let Some((path, rev)) = baseline {
        baseline_row(&mut s, &profile, path, rev, &log);
    }
    recipe_rows(&mut s, dir, &log);
    let steps_line: Vec<String> =
        log.0.iter().map(|(n, rc, secs)| format!("{n} {} {secs} s", if rc == "0" { "ok" } else { "FAILED" })).collect();
    if !steps_line.is_empty() {
        row(&mut s, "steps", &steps_line.join(", "));
    }
    s
}

/// One row of the summary: its label, then the text.
fn row(s: &mut String, label: &str, text: &str) {
    let _ = writeln!(s, "{label:<18}{text}");
}

/// The runner's step log: per step its name, exit status and seconds.
struct StepLog(Vec<(String, String, String)>);

impl StepLog {
    fn read(path: Option<&Path>) -> StepLog {
        let lines = path.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
        StepLog(
            lines
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    (f.len() >= 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
                })
                .collect(),
        )
    }

    /// How step `name` ended, in brackets.
    fn status(&self, name: &str) -> String {
        match self.0.iter().find(|(n, _, _)| n == name) {
            Some((_, rc, secs)) if rc == "0" => format!("[ok, {secs} s]"),
            Some((_, rc, secs)) if rc == "124" => format!("[STOPPED at its time limit, {secs} s]"),
            Some((_, rc, secs)) => format!("[FAILED: exit {rc}, {secs} s]"),
            None => "[not run]".into(),
        }
    }
}

/// The adapter and verify's outcome, with up to ten failed checks.
fn verify_rows(s: &mut String, dir: &Path, log: &StepLog) {
    let v = match read_json(&dir.join("verify.json")) {
        Ok(v) => v,
        Err(e) => return row(s, "verify", &format!("no result ({e}) {}", log.status("verify"))),
    };
    let adapter = format!("{}, driver {}", v["adapter"].as_str().unwrap_or("?"), v["driver"].as_str().unwrap_or("?"));
    row(s, "adapter", &adapter);
    let checks = v["checks"].as_array().cloned().unwrap_or_default();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != Value::Bool(true)).collect();
    let worst = checks
        .iter()
        .filter_map(|c| Some(c["error"].as_f64()? / c["tolerance"].as_f64().filter(|t| *t > 0.0)?))
        .fold(0.0, f64::max);
    let mut text = format!(
        "{}/{} checks passed at batch {} (largest error {:.0}% of its tolerance) {}",
        v["passed"],
        v["total"],
        v["batch_size"],
        100.0 * worst,
        log.status("verify")
    );
    for c in failed.iter().take(10) {
        let _ = write!(
            text,
            "\n{:<18}FAIL {} {} {}: error {} (tolerance {})",
            "",
            c["kernel"].as_str().unwrap_or("?"),
            c["layer"].as_str().unwrap_or("?"),
            c["shape"].as_str().unwrap_or("?"),
            c["error"],
            c["tolerance"]
        );
    }
    row(s, "verify", &text);
}

/// bench's images/s per backend: training steps, the training loop, evaluation.
fn bench_rows(s: &mut String, dir: &Path, log: &StepLog) {
    let v = match read_json(&dir.join("bench.json")) {
        Ok(v) => v,
        Err(e) => return row(s, "bench", &format!("no result ({e}) {}", log.status("bench"))),
    };
    let results = v["results"].as_array().cloned().unwrap_or_default();
    for (label, prefix) in
        [("training step", "training step"), ("training loop", "training loop"), ("evaluation", "evaluation")]
    {
        let figures: Vec<String> = results
            .iter()
            .filter(|r| r["what"].as_str().is_some_and(|w| w.starts_with(prefix)))
            .map(|r| {
                format!(
                    "{}: {} images/s",
                    r["device"].as_str().unwrap_or("?"),
                    thousands(r["images_per_sec_median"].as_f64().unwrap_or(0.0))
                )
            })
            .collect();
        row(s, label, &format!("{} {}", figures.join("; "), log.status("bench")));
    }
}

/// profile's step time and the three kernels that take most of it.
fn profile_row(s: &mut String, profile: &Result<Value, String>, log: &StepLog) {
    let v = match profile {
        Ok(v) => v,
        Err(e) => return row(s, "profile", &format!("no result ({e}) {}", log.status("profile"))),
    };
    let step_us = v["step_us"].as_f64().unwrap_or(0.0);
    let top: Vec<String> = v["kernels"]
        .as_array()
        .map(|k| {
            k.iter()
                .take(3)
                .map(|k| {
                    let us = k["median_us"].as_f64().unwrap_or(0.0);
                    format!("{} {:.0}%", k["kernel"].as_str().unwrap_or("?"), 100.0 * us / step_us.max(1e-9))
                })
                .collect()
        })
        .unwrap_or_default();
    row(s, "profile", &format!("{}; most: {} {}", profile_figures(v), top.join(", "), log.status("profile")));
}

/// The baseline build's profile, and the current build's time over it (same card, same run).
fn baseline_row(s: &mut String, profile: &Result<Value, String>, path: &Path, rev: &str, log: &StepLog) {
    let text = match read_json(path) {
        Ok(b) => {
            let ratio = |key: &str| -> Option<String> {
                let (now, then) = (profile.as_ref().ok()?[key].as_f64()?, b[key].as_f64()?);
                (then > 0.0).then(|| format!("{:.2}x", now / then))
            };
            let ratios: Vec<String> = [("step_us", "kernels each alone"), ("one_pass_us", "one pass")]
                .iter()
                .filter_map(|(key, what)| Some(format!("{} ({what})", ratio(key)?)))
                .collect();
            let against =
                if ratios.is_empty() { String::new() } else { format!("; this build's time: {}", ratios.join(", ")) };
            format!("{rev}: {}{against} {}", profile_figures(&b), log.status("profile-baseline"))
        }
        Err(e) => format!("{rev}: no result ({e}) {}", log.status("profile-baseline")),
    };
    row(s, "profile, baseline", &text);
}

/// The recipe's run on the GPU beside PyTorch's: epochs, times, accuracies, throughput.
fn recipe_rows(s: &mut String, dir: &Path, log: &StepLog) {
    let ours = read_jsonl(&dir.join("metrics.jsonl"));
    let torch = read_jsonl(&dir.join("torch.jsonl"));
    let torch_label = torch
        .as_ref()
        .ok()
        .and_then(|t| t.iter().find(|l| l.get("summary").is_some()))
        .map(|l| format!("PyTorch {} ({})", l["torch"].as_str().unwrap_or("?"), l["mode"].as_str().unwrap_or("?")))
        .unwrap_or_else(|| "PyTorch".into());
    let figures = |r: &Result<Vec<Value>, String>, step: &str| -> Result<RunFigures, String> {
        match r {
            Ok(lines) => run_figures(lines).ok_or_else(|| format!("no epoch finished {}", log.status(step))),
            Err(e) => Err(format!("{e} {}", log.status(step))),
        }
    };
    let (a, b) = (figures(&ours, "train"), figures(&torch, "torch"));
    let _ = writeln!(s, "{:<18}{:<36}{}", "the recipe", "mnist-wgpu train --backend gpu", torch_label);
    let cell = |r: &Result<RunFigures, String>, f: &dyn Fn(&RunFigures) -> String| match r {
        Ok(x) => f(x),
        Err(_) => "-".into(),
    };
    let lines: [Row; 7] = [
        ("epochs", &|x| x.epochs.to_string()),
        ("wall time", &|x| format!("{:.1} s", x.wall_seconds)),
        ("final accuracy", &|x| format!("{:.2}%", x.final_accuracy)),
        ("best accuracy", &|x| format!("{:.2}%", x.best_accuracy)),
        ("99.0% reached", &|x| reached(x.reached[0])),
        ("99.4% reached", &|x| reached(x.reached[1])),
        ("train images/s", &|x| format!("{} (median epoch)", thousands(x.median_images_per_sec))),
    ];
    for (label, f) in lines {
        let _ = writeln!(s, "{label:<18}{:<36}{}", cell(&a, f), cell(&b, f));
    }
    for (who, r) in [("ours", &a), ("PyTorch", &b)] {
        if let Err(e) = r {
            row(s, "", &format!("{who}: {e}"));
        }
    }
    if let (Ok(x), Ok(y)) = (&a, &b) {
        row(s, "", &format!("wall time ratio PyTorch / ours: {:.2}", y.wall_seconds / x.wall_seconds.max(1e-9)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_summarized_and_missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("mnist-wgpu-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let verify = serde_json::json!({"adapter": "Fake GPU (Vulkan, DiscreteGpu)", "driver": "fake 1.0", "batch_size": 100,
            "passed": 1, "total": 2, "checks": [
                {"kernel": "conv.forward", "layer": "conv1", "shape": "s", "error": 5e-6, "tolerance": 1e-5, "ok": true},
                {"kernel": "pool.gap_forward", "layer": "avgpool#18", "shape": "s", "error": null, "tolerance": 1e-6, "ok": false}]});
        std::fs::write(dir.join("verify.json"), verify.to_string()).unwrap();
        let epochs: Vec<String> = [(98.5, 10.0), (99.1, 11.0), (99.45, 9.0)]
            .iter()
            .enumerate()
            .map(|(i, (acc, secs))| {
                serde_json::json!({"epoch": i + 1, "test_accuracy": acc, "seconds": secs, "train_images_per_sec": 6000.0 + i as f64})
                    .to_string()
            })
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), epochs.join("\n")).unwrap();
        let steps = dir.join("steps.tsv");
        std::fs::write(&steps, "verify\t1\t3.2\t60\ntrain\t0\t31.0\t230\n").unwrap();
        let text = render(&dir, Some(&steps), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.contains("Fake GPU (Vulkan, DiscreteGpu), driver fake 1.0"), "{text}");
        assert!(
            text.contains(
                "1/2 checks passed at batch 100 (largest error 50% of its tolerance) [FAILED: exit 1, 3.2 s]"
            ),
            "{text}"
        );
        assert!(text.contains("FAIL pool.gap_forward avgpool#18"), "{text}");
        assert!(text.contains("30.0 s"), "{text}");
        assert!(text.contains("21.0 s (epoch 2)") && text.contains("30.0 s (epoch 3)"), "{text}");
        assert!(text.contains("99.45%") && text.contains("6,001 (median epoch)"), "{text}");
        assert!(text.contains("bench.json"), "a missing file is named: {text}");
        assert!(text.contains("torch.jsonl"), "{text}");
    }

    #[test]
    fn a_baseline_profile_is_set_beside_this_builds() {
        let dir = std::env::temp_dir().join(format!("mnist-wgpu-summary-baseline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // This build's profile, and an older build's without the one-pass time (as builds before it).
        let now = serde_json::json!({"dispatches_per_step": 29, "step_us": 600.0, "one_pass_us": 450.0,
            "kernels": [{"kernel": "conv.backward", "median_us": 300.0}]});
        std::fs::write(dir.join("profile.json"), now.to_string()).unwrap();
        let then = serde_json::json!({"step_us": 1500.0, "launches": vec![serde_json::json!({}); 51],
            "kernels": [{"kernel": "conv3x3.backward_weight", "median_us": 900.0}]});
        let old = dir.join("baseline.json");
        std::fs::write(&old, then.to_string()).unwrap();
        let steps = dir.join("steps.tsv");
        std::fs::write(&steps, "profile\t0\t4.0\t40\nprofile-baseline\t0\t5.5\t30\n").unwrap();
        let text = render(&dir, Some(&steps), Some((&old, "3a8599b")));
        let missing = render(&dir, Some(&steps), Some((&dir.join("none.json"), "3a8599b")));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            text.contains("29 launches, 600 us of kernels per step (each timed alone), 450 us as one pass"),
            "{text}"
        );
        assert!(
            text.contains(
                "3a8599b: 51 launches, 1,500 us of kernels per step (each timed alone); \
                 this build's time: 0.40x (kernels each alone) [ok, 5.5 s]"
            ),
            "{text}"
        );
        assert!(missing.contains("3a8599b: no result") && missing.contains("none.json"), "{missing}");
    }
}
