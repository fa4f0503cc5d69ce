//! The command line as a user meets it: every bad value of a flag gets a message naming the flag, no
//! input panics, nothing is created or opened before the flags are checked, a checkpoint with NaN
//! weights is refused, `eval` needs no optimizer file, and Ctrl-C exits with status 130 after saving.
//! Each case runs the real binary on the CPU backend.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mnist_wgpu::checkpoint::{self, Position};
use mnist_wgpu::model::Model;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mnist-wgpu"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("running mnist-wgpu")
}

/// Runs a command that must fail: exit status 1 (2 for what the argument parser refuses, as is usual),
/// no panic, and an error containing `want`.
fn fails_with(args: &[&str], want: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}: status {:?}\n{err}", out.status);
    assert!(err.contains(want), "{args:?}: expected {want:?} in:\n{err}");
}

/// A fresh folder under the target directory, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_bad_training_flag_is_named_before_any_work() {
    let dir = scratch("flags");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::write_set(&data, 50, 20, false);
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    let train = |extra: &[&str], want: &str| {
        let mut args = vec!["train", "--backend", "cpu", "--data", data.to_str().unwrap(), "--out", out_s];
        args.extend_from_slice(extra);
        if !extra.contains(&"--batch-size") {
            args.extend(["--batch-size", "10"]);
        }
        fails_with(&args, want);
        assert!(!out.exists(), "{extra:?} created the run folder before failing");
    };
    train(&["--epochs", "0"], "--epochs and --batch-size must be at least 1");
    train(&["--batch-size", "0"], "--epochs and --batch-size must be at least 1");
    train(&["--batch-size", "51"], "--batch-size 51 (or the model file's [train] batch_size) is larger than the 50");
    // A negative number is read as the flag's value, and refused by the flag's own check.
    train(&["--max-lr", "-1"], "--max-lr must be a positive number");
    train(&["--max-lr", "nan"], "--max-lr must be a positive number");
    train(&["--epochs", "-1"], "invalid value '-1' for '--epochs");
    train(&["--save-augmented", "0"], "--save-augmented must be at least 1");
    train(&["--steps-per-submit", "0"], "--steps-per-submit must be 1 to");
    train(&["--loader-threads", "0"], "--loader-threads must be 1 to 1024");
    train(&["--rotate", "200"], "rotate must be 0 to 180 degrees, not 200");
    train(&["--translate", "5"], "translate must be 0 to 4 pixels");
    train(&["--cutout", "-0.5"], "cutout must be a probability");
    train(&["--seeds", "5-1"], "--seeds");
    train(&["--model", "no-such-model"], "--model no-such-model: no such file, and no preset");
    train(&["--resume", dir.join("none.safetensors").to_str().unwrap()], "none.safetensors");
    for args in [&["bench", "--steps", "0"][..], &["profile", "--steps", "0"], &["verify", "--batch-size", "0"]] {
        fails_with(args, "must be at least 1");
    }
}

#[test]
fn eval_refuses_nan_weights_and_needs_no_optimizer_file() {
    let dir = scratch("eval");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::write_set(&data, 20, 30, false);
    let model = Model::net3();
    let mut state = model.init_state(1);
    let momenta = checkpoint::OptimState { kind: Default::default(), moments: vec![0.0; model.num_trainable] };
    let position =
        Position { epoch: 1, batch_in_epoch: 0, global_step: 1, test_accuracy: None, seed: 1, recipe: "{}".into() };
    let good = dir.join("good.safetensors");
    checkpoint::save(&good, &model, &state, &momenta, &position).unwrap();
    std::fs::remove_file(checkpoint::optim_path(&good)).unwrap();
    let (data_s, good_s) = (data.to_str().unwrap(), good.to_str().unwrap());
    let out = run(&["eval", good_s, "--backend", "cpu", "--data", data_s]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("Accuracy:"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    fails_with(&["eval", good_s, "--backend", "cpu", "--data", data_s, "--batch-size", "0"], "--batch-size must be");

    state[model.param("conv3.weight").unwrap().offset + 5] = f32::INFINITY;
    let bad = dir.join("bad.safetensors");
    checkpoint::save(&bad, &model, &state, &momenta, &position).unwrap();
    let want = "conv3.weight holds NaN or infinite values";
    fails_with(&["eval", bad.to_str().unwrap(), "--backend", "cpu", "--data", data_s], want);
}

/// Ctrl-C (SIGINT) finishes the steps handed over, saves a checkpoint that resumes, and exits with 130.
#[cfg(unix)]
#[test]
fn an_interrupted_run_saves_and_exits_with_130() {
    let dir = scratch("interrupt");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::write_set(&data, 400, 20, false);
    let out = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mnist-wgpu"))
        .args(["train", "--backend", "cpu", "--epochs", "1000", "--batch-size", "20"])
        .args(["--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once an epoch has ended (its metrics line is written after its checkpoint), the run is well under way.
    let metrics = out.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(true, |t| t.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "no epoch finished in 120 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert_eq!(status.code(), Some(130), "{stdout}");
    assert!(stdout.contains("Interrupted: saved"), "{stdout}");
    let model = Model::net3();
    let pos = checkpoint::load(&out.join("last.safetensors"), &model).unwrap().position.unwrap();
    assert!(pos.global_step >= 20, "saved at step {}", pos.global_step);
}

/// Test-set digits drawn large, dark ink on a light coloured background (PNG and JPEG), come back as
/// their labels through `predict`; an empty, a corrupt and a blank file are named with the reason while
/// the others are still predicted.
#[test]
fn predict_reads_large_light_background_pictures_of_test_digits() {
    use image::{Rgb, RgbImage};
    let dir = scratch("predict");
    let test = mnist_wgpu::data::load_dir(&mnist_wgpu::data::default_dir()).unwrap().test;
    let (cream, blue) = ([250.0, 244.0, 228.0], [20.0, 40.0, 110.0]);
    let mut args: Vec<String> = Vec::new();
    let count = 30;
    for i in 0..count {
        let digit = test.image(i);
        // Five times larger, off centre in a 200 x 160 picture; the ink blends cream into blue.
        let picture = RgbImage::from_fn(200, 160, |x, y| {
            let (sx, sy) = ((x as i64 - 40) / 5, (y as i64 - 10) / 5);
            let ink =
                if (0..28).contains(&sx) && (0..28).contains(&sy) { digit[sy as usize * 28 + sx as usize] } else { 0 };
            let t = ink as f32 / 255.0;
            Rgb([0, 1, 2].map(|c| (cream[c] * (1.0 - t) + blue[c] * t) as u8))
        });
        let path = dir.join(format!("digit-{i}-label-{}.{}", test.labels[i], if i % 2 == 0 { "png" } else { "jpg" }));
        picture.save(&path).unwrap();
        args.push(path.to_str().unwrap().into());
    }
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    std::fs::write(dir.join("corrupt.jpg"), b"\xff\xd8\xff\xe0 not really a JPEG").unwrap();
    RgbImage::from_pixel(120, 90, Rgb([250, 244, 228])).save(dir.join("blank.png")).unwrap();
    // A PNG of a few bytes that declares 100,000 x 100,000 pixels: refused before they are decoded.
    let chunk = |kind: &[u8], data: &[u8]| -> Vec<u8> {
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        [&(data.len() as u32).to_be_bytes()[..], kind, data, &crc.sum().to_be_bytes()].concat()
    };
    let header = [&100_000u32.to_be_bytes()[..], &100_000u32.to_be_bytes(), &[8, 0, 0, 0, 0]].concat();
    let huge = [
        &b"\x89PNG\r\n\x1a\n"[..],
        &chunk(b"IHDR", &header),
        &chunk(b"IDAT", &common::gzip(&[0; 100])),
        &chunk(b"IEND", b""),
    ]
    .concat();
    std::fs::write(dir.join("huge.png"), huge).unwrap();
    for bad in ["empty.png", "corrupt.jpg", "blank.png", "huge.png"] {
        args.insert(3, dir.join(bad).to_str().unwrap().into());
    }
    let checkpoint = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/results/cpu-20-epochs/best.safetensors");
    let seen = dir.join("seen");
    let mut all = vec!["predict", checkpoint.to_str().unwrap(), "--backend", "cpu", "--save-preprocessed"];
    all.push(seen.to_str().unwrap());
    all.extend(args.iter().map(String::as_str));
    let out = run(&all);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("empty.png: cannot read it as an image"), "{stderr}");
    assert!(stderr.contains("corrupt.jpg: cannot read it as an image"), "{stderr}");
    assert!(stderr.contains("blank.png: no digit found"), "{stderr}");
    assert!(stderr.contains("huge.png: the picture is over 8192 pixels wide or high"), "{stderr}");
    assert!(stderr.contains("4 of 34 images could not be predicted"), "{stderr}");
    let mut correct = 0;
    for line in stdout.lines().filter(|l| l.contains("-label-")) {
        // .../digit-I-label-L.png: P (99.9%), ...
        let label = line.split("-label-").nth(1).unwrap().chars().next().unwrap();
        let predicted = line.split(": ").nth(1).unwrap().chars().next().unwrap();
        correct += (label == predicted) as usize;
    }
    assert_eq!(stdout.lines().filter(|l| l.contains("-label-")).count(), count, "{stdout}");
    // Measured: 30 of 30 (the checkpoint gets 99.49% of the test set as MNIST prepared it).
    assert!(correct >= count - 1, "{correct} of {count} right:\n{stdout}");
    let saved = std::fs::read_dir(&seen).unwrap().count();
    assert_eq!(saved, count, "one 28x28 PNG per predicted image in --save-preprocessed");
}

/// A finished run leaves its record, its pictures and its page; `report` draws them again.
#[test]
fn a_finished_run_draws_its_pictures_and_page() {
    let dir = scratch("report");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::write_set(&data, 60, 30, false);
    let out = dir.join("run");
    let (data_s, out_s) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = ["train", "--backend", "cpu", "--epochs", "2", "--batch-size", "20", "--data", data_s, "--out", out_s];
    let done = run(&args);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{stdout}{}", String::from_utf8_lossy(&done.stderr));
    assert!(stdout.contains("Wrote curves.png, confusion.png, misclassified.png, report.html"), "{stdout}");
    let run_json = std::fs::read_to_string(out.join("run.json")).unwrap();
    assert!(run_json.contains("--epochs 2") && run_json.contains("cpu"), "{run_json}");
    for name in ["curves.png", "confusion.png", "misclassified.png"] {
        assert!(image::open(out.join(name)).is_ok(), "{name}");
    }
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(page.matches("<tr><td>").count(), 2, "one row per epoch");
    std::fs::remove_file(out.join("report.html")).unwrap();
    let again = run(&["report", out_s, "--backend", "cpu", "--data", data_s]);
    assert!(again.status.success() && out.join("report.html").exists());
    fails_with(&["report", data_s, "--backend", "cpu"], "no last.safetensors or best.safetensors");
}

/// Writes the first `n_train` training and `n_test` test images of the bundled MNIST into `dir`.
fn write_mnist_subset(dir: &Path, n_train: usize, n_test: usize) {
    use mnist_wgpu::data::{self, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS};
    let full = data::load_dir(&data::default_dir()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (split, n, images, labels) in
        [(&full.train, n_train, TRAIN_IMAGES, TRAIN_LABELS), (&full.test, n_test, TEST_IMAGES, TEST_LABELS)]
    {
        let pixels = &split.images[..n * data::IMAGE_PIXELS];
        std::fs::write(dir.join(images), common::idx_bytes(&[n as u32, 28, 28], pixels)).unwrap();
        std::fs::write(dir.join(labels), common::idx_bytes(&[n as u32], &split.labels[..n])).unwrap();
    }
}

/// SIGKILL at 20 random moments (checkpoint writes included: one is written every 10 steps) loses
/// nothing: after every kill the last checkpoint loads with its momenta, `--resume` carries on, and the
/// run ends with the same parameters and momenta, bit for bit, as one never killed.
#[cfg(unix)]
#[test]
fn twenty_kills_at_random_moments_lose_nothing() {
    let dir = scratch("kill");
    let data = dir.join("data");
    write_mnist_subset(&data, 200, 50);
    // Enough epochs that the 20 kills (about 3 s of running) come well before the end on the CPU
    // backend (100 epochs once finished after 18).
    let flags = |out: &Path| -> Vec<String> {
        let args = ["train", "--backend", "cpu", "--epochs", "300", "--batch-size", "20", "--loader-threads", "1"];
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--data".into(), data.to_str().unwrap().into(), "--out".into(), out.to_str().unwrap().into()]);
        v
    };
    let reference = dir.join("reference");
    let done = run(&flags(&reference).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));

    let killed = dir.join("killed");
    let last = killed.join("last.safetensors");
    let model = Model::net3();
    // A fixed xorshift sequence: the same moments on every run of the test.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    loop {
        let mut args = flags(&killed);
        if last.exists() {
            args.extend(["--resume".into(), last.to_str().unwrap().into()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_mnist-wgpu"))
            .args(&args)
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(std::time::Duration::from_millis(20 + rng % 250));
        if kills == 20 || child.try_wait().unwrap().is_some() {
            // Enough kills: let the run finish.
            let status = child.wait().unwrap();
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(status.success(), "after {kills} kills: {err}");
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        if last.exists() {
            let ck = checkpoint::load(&last, &model).unwrap_or_else(|e| panic!("after kill {kills}: {e:#}"));
            assert!(ck.optim.is_some(), "after kill {kills}: no optimizer state");
        }
    }
    assert_eq!(kills, 20, "the run finished before 20 kills; give it more epochs");
    let (want, got) = (
        checkpoint::load(&reference.join("last.safetensors"), &model).unwrap(),
        checkpoint::load(&last, &model).unwrap(),
    );
    assert_eq!(got.position, want.position);
    assert!(got.state == want.state && got.optim == want.optim, "the killed run ended elsewhere");
}

/// Under a lowered address-space limit, a batch size that cannot fit is refused with the figure and
/// the limit in seconds, before anything is allocated or created (without the check, batch 6000 under
/// this limit aborted on an allocation; batch 3600, which the check lets through, trains).
#[cfg(target_os = "linux")]
#[test]
fn a_batch_that_cannot_fit_under_ulimit_v_is_refused_at_once() {
    let out = scratch("memory").join("run");
    let bin = env!("CARGO_BIN_EXE_mnist-wgpu");
    let started = std::time::Instant::now();
    let script = format!(
        "ulimit -v 3000000 && exec '{bin}' train --backend cpu --batch-size 20000 --epochs 1 --out '{}'",
        out.display()
    );
    let done = Command::new("sh").args(["-c", &script]).env("XDG_RUNTIME_DIR", std::env::temp_dir()).output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(1), "{err}");
    assert!(err.contains("batch size 20000 needs about") && err.contains("ulimit -v"), "{err}");
    assert!(started.elapsed().as_secs() < 30, "took {:?}", started.elapsed());
    assert!(!out.exists(), "the run folder was created before the check");
}

/// The resident size of process `pid` in KiB (VmRSS), if it is still running.
#[cfg(target_os = "linux")]
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A 100-epoch CPU run keeps a flat memory: its resident size as its 99th epoch ends (the 100th is
/// followed at once by the drawing of the pictures) is within 5% of what it was as its second ended,
/// and never above that in between, so nothing grows per step, per epoch or per checkpoint. One loader
/// thread: with two, glibc's allocator adds arenas over the first ten epochs or so (about 0.9 MiB, 5%
/// of this small run's 19 MiB, measured), then stays flat as well.
#[cfg(target_os = "linux")]
#[test]
fn a_hundred_epochs_keep_a_flat_memory() {
    let dir = scratch("flat");
    let data = dir.join("data");
    write_mnist_subset(&data, 200, 50);
    let out = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mnist-wgpu"))
        .args(["train", "--backend", "cpu", "--epochs", "100", "--batch-size", "20", "--loader-threads", "1"])
        .args(["--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let epochs_done = || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
    // The resident size sampled as each epoch's line appears (the first sample after it).
    let mut at_epoch: Vec<Option<u64>> = vec![None; 101];
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        let done = epochs_done();
        if let Some(kib) = resident_kib(child.id()) {
            if (1..=100).contains(&done) && at_epoch[done].is_none() {
                at_epoch[done] = Some(kib);
            }
        }
        assert!(started.elapsed().as_secs() < 600, "100 epochs took over 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(child.wait().unwrap().success());
    let second = at_epoch[2].expect("sampled as epoch 2 ended");
    let last = at_epoch[99].expect("sampled as epoch 99 ended");
    let highest = at_epoch[2..100].iter().flatten().max().copied().unwrap();
    eprintln!("resident size: epoch 2 {second} KiB, epoch 99 {last} KiB, highest in between {highest} KiB");
    assert!(last as f64 <= second as f64 * 1.05, "grew from {second} KiB to {last} KiB over 97 epochs");
    assert!(highest as f64 <= second as f64 * 1.05, "reached {highest} KiB after {second} KiB at epoch 2");
}

/// `profile --backend cpu` and `cpu-reference`: one row per pass of the CPU backend's step, or per op of
/// the reference's (each layer's forward and backward, the loss, the update), each with its FLOPs, and
/// the machine's peak; GPU-only flags refused.
#[test]
fn the_cpu_profile_times_every_op_beside_the_peak() {
    let profile = |backend: &str| {
        let out = run(&["profile", "--backend", backend, "--steps", "1", "--batch-size", "8", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["ops"].as_array().unwrap().iter().all(|o| o["median_us"].as_f64().unwrap() > 0.0), "{v}");
        assert!(v["peak_gflop_per_s"].as_f64().unwrap() > 0.0 && v["peak"].as_str().unwrap().contains("sgemm"));
        // The FMA ceiling: on a CPU with FMA (every x86-64 CI machine), above nothing but zero.
        assert!(v["fma_ceiling_gflop_per_s"].as_f64().is_some_and(|g| g > 0.0), "{v}");
        v
    };
    // The reference: Net3's 22 layers forward and backward, the loss and the update.
    let reference = profile("cpu-reference");
    let ops = reference["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 2 * 22 + 2, "{reference}");
    assert_eq!(ops[0]["op"], "conv.forward conv1");
    // The CPU backend: 7 passes each way (one per batchnorm, and the first), the loss and the update,
    // counting the same FLOPs.
    let fused = profile("cpu");
    let passes = fused["ops"].as_array().unwrap();
    assert_eq!(passes.len(), 7 + 7 + 2, "{fused}");
    assert_eq!(passes[1]["op"], "fused.forward bn1+relu#2+conv2");
    let flops = |ops: &[serde_json::Value]| ops.iter().map(|o| o["flops"].as_f64().unwrap()).sum::<f64>();
    assert!((flops(passes) / flops(ops) - 1.0).abs() < 1e-9, "{} against {}", flops(passes), flops(ops));
    fails_with(&["profile", "--backend", "cpu", "--trace", "t.json"], "--trace and --adapter are for --backend gpu");
}

/// `profile` and `bench` asked for more batches than an epoch holds start over from the first (here
/// 4 of 20,000 images from a training set of 60,000) instead of running off its end.
#[test]
fn timed_runs_longer_than_an_epoch_start_the_epoch_again() {
    let mlp = concat!(env!("CARGO_MANIFEST_DIR"), "/models/mlp3.toml");
    for args in [
        &["profile", "--backend", "cpu", "--model", mlp, "--batch-size", "20000", "--steps", "3"][..],
        &["bench", "--backends", "cpu", "--model", mlp, "--batch-size", "20000", "--steps", "4", "--repeats", "1"],
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("panicked"), "{args:?}:\n{err}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("batch 20000"), "{args:?}");
    }
}

/// `speedrun` trains a network once per seed and reports the times and accuracies as JSON with the
/// fields the issue names; a wrong target, a validation split larger than the data and a batch larger
/// than the data are refused by name.
#[test]
fn speedrun_reports_each_seed_and_the_summary() {
    let dir = scratch("speedrun");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::write_set(&data, 64, 40, false);
    let model = dir.join("tiny.toml");
    std::fs::write(&model, "[[layer]]\ntype = \"linear\"\nout = 10\n\n[train]\nepochs = 2\nbatch_size = 16\n").unwrap();
    let (data_s, model_s) = (data.to_str().unwrap(), model.to_str().unwrap());
    let args =
        ["speedrun", "--target", "99.0", "--seeds", "3,5", "--backend", "cpu", "--data", data_s, "--model", model_s];
    let out = run(&[&args[..], &["--json"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(json["target"], 99.0);
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.iter().map(|r| r["seed"].as_u64().unwrap()).collect::<Vec<_>>(), [3, 5]);
    for r in runs {
        assert!(r["train_seconds"].as_f64().unwrap() > 0.0 && r["eval_seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!((0.0..=100.0).contains(&r["accuracy"].as_f64().unwrap()), "{r}");
    }
    let mean = runs.iter().map(|r| r["accuracy"].as_f64().unwrap()).sum::<f64>() / 2.0;
    assert!((json["mean_accuracy"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert!(json["median_train_seconds"].as_f64().unwrap() > 0.0);
    // The table: a row per seed and the summary line.
    let out = run(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("of 2 seeds reached 99.0%"), "{text}");
    fails_with(&["speedrun", "--target", "98", "--data", data_s], "--target 98: the targets are 99.0 and 99.4");
    fails_with(
        &["speedrun", "--target", "99.4", "--validation", "--data", data_s, "--backend", "cpu"],
        "--validation holds out",
    );
    let big = dir.join("big.toml");
    std::fs::write(&big, "[[layer]]\ntype = \"linear\"\nout = 10\n\n[train]\nbatch_size = 100\n").unwrap();
    fails_with(
        &["speedrun", "--target", "99.0", "--data", data_s, "--model", big.to_str().unwrap(), "--backend", "cpu"],
        "batch size 100 is larger than the 64 training images",
    );
}
