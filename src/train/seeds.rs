//! Several trainings of one recipe, one per seed: the seeds flag, and the table of their results
//! (per seed the final and best test accuracy and the time; then mean, standard deviation, min, max).

use anyhow::{bail, Result};

/// Parses `--seeds`: a range `1-5`, a list `1,4,9`, or both mixed (`1-3,7`); each seed once.
pub fn parse_seeds(text: &str) -> Result<Vec<u64>> {
    let mut seeds = Vec::new();
    for part in text.split(',').map(str::trim) {
        let number = |s: &str| -> Result<u64> {
            s.trim().parse().map_err(|_| anyhow::anyhow!("--seeds {text}: {s:?} is not a seed (a whole number)"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    bail!("--seeds {text}: the range {part} runs backwards");
                }
                if b - a >= 1000 {
                    bail!("--seeds {text}: {} seeds is too many (1000 at most)", b - a + 1);
                }
                seeds.extend(a..=b);
            }
            None => seeds.push(number(part)?),
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = seeds.iter().find(|s| !seen.insert(**s)) {
        bail!("--seeds {text}: seed {twice} appears twice");
    }
    Ok(seeds)
}

/// One training's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeedRun {
    pub seed: u64,
    /// Test accuracy (percent) after the last epoch, and the best over the epochs.
    pub final_accuracy: f64,
    pub best_accuracy: f64,
    pub seconds: f64,
}

/// Mean, sample standard deviation (0 for one value), min and max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(values: &[f64]) -> Spread {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    Spread { mean, std: var.sqrt(), min, max }
}

/// The table `train --seeds` prints.
pub fn table(runs: &[SeedRun]) -> String {
    let mut out = format!("{:>6} {:>10} {:>10} {:>10}\n", "seed", "final %", "best %", "seconds");
    for r in runs {
        out += &format!("{:>6} {:>10.2} {:>10.2} {:>10.1}\n", r.seed, r.final_accuracy, r.best_accuracy, r.seconds);
    }
    if !runs.is_empty() {
        let f = spread(&runs.iter().map(|r| r.final_accuracy).collect::<Vec<_>>());
        let b = spread(&runs.iter().map(|r| r.best_accuracy).collect::<Vec<_>>());
        let t = spread(&runs.iter().map(|r| r.seconds).collect::<Vec<_>>());
        for (name, pick) in [
            ("mean", (|s: &Spread| s.mean) as fn(&Spread) -> f64),
            ("std", |s| s.std),
            ("min", |s| s.min),
            ("max", |s| s.max),
        ] {
            out += &format!("{name:>6} {:>10.2} {:>10.2} {:>10.1}\n", pick(&f), pick(&b), pick(&t));
        }
    }
    out
}

/// `seeds.json`: every run, and the spread of the final and best accuracies.
pub fn to_json(runs: &[SeedRun], command: &str) -> serde_json::Value {
    let spread_json = |values: Vec<f64>| {
        let s = spread(&values);
        serde_json::json!({"mean": s.mean, "std": s.std, "min": s.min, "max": s.max})
    };
    serde_json::json!({
        "command": command,
        "runs": runs.iter().map(|r| serde_json::json!({
            "seed": r.seed,
            "final_accuracy": r.final_accuracy,
            "best_accuracy": r.best_accuracy,
            "seconds": r.seconds,
        })).collect::<Vec<_>>(),
        "final_accuracy": spread_json(runs.iter().map(|r| r.final_accuracy).collect()),
        "best_accuracy": spread_json(runs.iter().map(|r| r.best_accuracy).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_as_ranges_and_lists() {
        assert_eq!(parse_seeds("1-5").unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(parse_seeds("1,4, 9").unwrap(), vec![1, 4, 9]);
        assert_eq!(parse_seeds("1-3,7").unwrap(), vec![1, 2, 3, 7]);
        assert_eq!(parse_seeds("0").unwrap(), vec![0]);
        for (bad, says) in [
            ("5-1", "backwards"),
            ("1,x", "\"x\" is not a seed"),
            ("", "is not a seed"),
            ("1-2,2", "seed 2 appears twice"),
            ("-3", "is not a seed"),
            ("1-100000", "too many"),
        ] {
            let e = parse_seeds(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_table_ends_in_mean_std_min_max() {
        let runs = [
            SeedRun { seed: 1, final_accuracy: 99.4, best_accuracy: 99.5, seconds: 10.0 },
            SeedRun { seed: 2, final_accuracy: 99.6, best_accuracy: 99.6, seconds: 12.0 },
        ];
        let s = spread(&[99.4, 99.6]);
        assert!((s.mean - 99.5).abs() < 1e-12 && (s.std - 0.141_421_356).abs() < 1e-8);
        assert_eq!((s.min, s.max), (99.4, 99.6));
        let t = table(&runs);
        assert!(t.contains("  mean      99.50      99.55       11.0"), "{t}");
        assert!(t.contains("   std       0.14       0.07        1.4"), "{t}");
        let j = to_json(&runs, "train --seeds 1-2");
        assert_eq!(j["runs"][1]["seed"], 2);
        assert!((j["final_accuracy"]["mean"].as_f64().unwrap() - 99.5).abs() < 1e-12);
    }
}
