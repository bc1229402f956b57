//! `tarflow train` end to end: the loss goes down, resume is exact, kills never corrupt a
//! checkpoint, Ctrl-C checkpoints, and bad configs name the key.

mod common;

use approx::{abs_diff_eq, assert_abs_diff_eq};
use common::{tarflow, text, train, TINY};
use std::path::{Path, PathBuf};
use std::process::Command;
use tarflow::train::checkpoints::RunDir;
use tarflow::train::metrics::{read, Record};

fn write_config(dir: &Path, text: &str) -> PathBuf {
    write_named(dir, "tiny.toml", text)
}

fn write_named(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    read(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r: &Record| r.loss.map(|l| (r.step, l)))
        .collect()
}

#[test]
fn a_tiny_run_lowers_the_loss_and_writes_its_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let o = train(&cfg, dir.path(), &["train.keep_checkpoints=2"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("tiny");
    let l = losses(&run);
    assert_eq!(l.len(), 24, "one log line per step");
    let first: f64 = l[..4].iter().map(|x| x.1).sum::<f64>() / 4.0;
    let last: f64 = l[20..].iter().map(|x| x.1).sum::<f64>() / 4.0;
    assert!(last < first - 0.1, "loss {first} → {last}");
    let val: Vec<f64> = read(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.val_bpd)
        .collect();
    assert_eq!(val.len(), 2, "validation at steps 12 and 24");
    assert!(val[1] < val[0] && val[1] > 0.0 && val[1] < 9.0, "{val:?}");
    for f in [
        "config.toml",
        "latest",
        "plots/loss.png",
        "plots/bpd.png",
        "samples/step-0000012.png",
        "samples/step-0000024.png",
        "checkpoints/step-0000024/ema.safetensors",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    // Only the newest two checkpoints are kept; the last one is a usable model.
    assert!(!run.join("checkpoints/step-0000008").exists());
    let ck = tarflow::Checkpoint::load(
        run.join("checkpoints/step-0000024/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(ck.config.num_classes, 10);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("finished at step 24") && out.contains("validation bits/dim"),
        "{out}"
    );
    // Starting again over the same run is refused instead of overwriting it.
    let o = train(&cfg, dir.path(), &[]);
    assert!(
        !o.status.success() && text(&o).contains("--resume"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_losses_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    // Both runs share the schedule of a 16-step run (optim.decay_steps).
    let common = [
        "train.checkpoint_every=4",
        "optim.decay_steps=16",
        "eval.every=0",
    ];
    let mut full = common.to_vec();
    full.extend(["train.max_steps=16", "output.name=full"]);
    let o = train(&cfg, dir.path(), &full);
    assert!(o.status.success(), "{}", text(&o));
    let mut half = common.to_vec();
    half.extend(["train.max_steps=8", "output.name=half"]);
    let o = train(&cfg, dir.path(), &half);
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("half");
    let o = tarflow(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "train.max_steps=16",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let a = losses(&dir.path().join("full"));
    let b = losses(&run);
    assert_eq!(a.len(), 16);
    assert_eq!(a, b, "per-step losses differ after resume");
    // The weights, EMA and optimizer moments end bit-identical too.
    common::assert_same_checkpoint(&dir.path().join("full"), &run, "checkpoints/step-0000016");
}

/// `train.cpu_streams` runs each micro-batch as concurrent parts: the losses are one pass's up
/// to float rounding, and the numbers do not depend on the number of threads.
#[test]
fn concurrent_cpu_streams_train_like_one_pass_on_any_number_of_threads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let run = |name: &str, streams: &str, threads: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_tarflow"))
            .args(["train", "--config", cfg.to_str().unwrap()])
            .args(["--set", &format!("output.dir={}", dir.path().display())])
            .args(["--set", &format!("output.name={name}")])
            .args(["--set", &format!("train.cpu_streams={streams}")])
            .args(["--set", "train.max_steps=6", "--set", "eval.every=0"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        losses(&dir.path().join(name))
    };
    let one = run("one", "1", "1");
    let two = run("two", "2", "1");
    let two_on_two = run("two2", "2", "2");
    assert_eq!(one.len(), 6);
    for ((s, a), (_, b)) in one.iter().zip(&two) {
        assert!(
            abs_diff_eq!(a, b, epsilon = 1e-4 * a.abs().max(1.0)),
            "step {s}: one pass {a}, two streams {b}"
        );
    }
    assert_eq!(two, two_on_two, "cpu_streams = 2 on 1 thread and on 2");
    common::assert_same_checkpoint(
        &dir.path().join("two"),
        &dir.path().join("two2"),
        "checkpoints/step-0000006",
    );
}

/// Stale half-written checkpoint folders (`.tmp-step-…`) of a killed process.
fn temp_folders(run: &Path) -> usize {
    std::fs::read_dir(run.join("checkpoints")).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .count()
    })
}

#[test]
fn fifty_kills_leave_loadable_checkpoints_and_the_uninterrupted_result() {
    // kill -9 at random moments (seeded), checkpointing every step so that many kills land
    // inside a checkpoint write; resume after each. Every kill must leave a loadable `latest`,
    // and the run, finished, must equal one that was never interrupted, bit for bit.
    const KILLS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let run = dir.path().join("tiny");
    let out_set = format!("output.dir={}", dir.path().display());
    let sets = [
        "train.checkpoint_every=1",
        "train.max_steps=1000000",
        "optim.decay_steps=2000",
        "eval.every=0",
        "eval.sample_every=0",
    ];
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let (mut mid_write, mut steps_seen) = (0, Vec::new());
    for kill in 1..=KILLS {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tarflow"));
        cmd.env("RAYON_NUM_THREADS", "1");
        if RunDir::new(&run).latest().unwrap().is_none() {
            let _ = std::fs::remove_dir_all(&run);
            cmd.args([
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--set",
                &out_set,
            ]);
        } else {
            cmd.args(["train", "--resume", run.to_str().unwrap()]);
        }
        for s in sets {
            cmd.args(["--set", s]);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = 150 + rng % 450; // ms: start-up takes ~150 ms, a step ~15
        std::thread::sleep(std::time::Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        mid_write += temp_folders(&run).min(1);
        if let Some(latest) = RunDir::new(&run).latest().unwrap() {
            let r = RunDir::load_checkpoint(&latest, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("after kill {kill} at {delay} ms: {e}"));
            steps_seen.push(r.state.step);
        }
    }
    let last = *steps_seen.last().expect("some checkpoint was written");
    assert!(
        last >= 50,
        "the run kept moving: step {last} after {KILLS} kills"
    );
    assert!(
        steps_seen.windows(2).all(|w| w[0] <= w[1]),
        "no kill lost a finished checkpoint: {steps_seen:?}"
    );
    eprintln!(
        "{KILLS} kills survived; {mid_write} landed inside a checkpoint write; final step {last}"
    );
    assert!(mid_write >= 1, "no kill landed inside a checkpoint write");
    // Finish a few steps past the last checkpoint, then train the same steps uninterrupted.
    let end = (last + 3).to_string();
    let max = format!("train.max_steps={end}");
    let o = tarflow(&["train", "--resume", run.to_str().unwrap(), "--set", &max]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(temp_folders(&run), 0, "stale temp folders were cleaned up");
    let mut full: Vec<&str> = sets.to_vec();
    full.extend(["train.checkpoint_every=1000000", &max, "output.name=full"]);
    let o = train(&cfg, dir.path(), &full);
    assert!(o.status.success(), "{}", text(&o));
    let step = format!("checkpoints/step-{:07}", last + 3);
    common::assert_same_checkpoint(&dir.path().join("full"), &run, &step);
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let out_set = format!("output.dir={}", dir.path().display());
    let child = Command::new(env!("CARGO_BIN_EXE_tarflow"))
        .env("RAYON_NUM_THREADS", "1")
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &out_set,
        ])
        .args([
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.checkpoint_every=100000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(text(&o).contains("resume with"), "{}", text(&o));
    let run = dir.path().join("tiny");
    let latest = RunDir::new(&run).latest().unwrap().expect("a checkpoint");
    let r = RunDir::load_checkpoint(&latest, &candle_core::Device::Cpu).unwrap();
    assert!(r.state.step >= 1);
}

#[test]
fn a_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let o = train(
        &cfg,
        dir.path(),
        &[
            "optim.lr=1e4",
            "optim.grad_clip=0",
            "optim.warmup_steps=0",
            "train.checkpoint_every=1",
        ],
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("error: step ") && t.contains("stopped"), "{t}");
    // Step 1 is finite and checkpointed; the error points at it and it loads.
    let run = dir.path().join("tiny");
    let latest = RunDir::new(&run)
        .latest()
        .unwrap()
        .expect("the step-1 checkpoint");
    assert!(
        t.contains("last good checkpoint") && t.contains("step-0000001"),
        "{t}"
    );
    RunDir::load_checkpoint(&latest, &candle_core::Device::Cpu).unwrap();
}

#[test]
fn config_errors_name_the_key_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let o = train(&cfg, dir.path(), &["train.max_stepz=3"]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("max_stepz") && t.contains("max_steps"),
        "{t}"
    );
    let o = train(&cfg, dir.path(), &["data.noise=salt"]);
    let t = text(&o);
    assert!(t.contains("salt") && t.contains("gaussian"), "{t}");
    let bad = write_named(
        dir.path(),
        "bad.toml",
        &TINY.replace("[optim]", "[optim]\nlearning_rate = 1"),
    );
    let o = train(&bad, dir.path(), &[]);
    let t = text(&o);
    assert!(t.contains("learning_rate") && t.contains("bad.toml"), "{t}");
    assert!(t.contains("line 18") && t.contains("`lr`"), "{t}");
    // The model must fit the data.
    let o = train(
        &cfg,
        dir.path(),
        &["model.img_size=32", "model.patch_size=8"],
    );
    let t = text(&o);
    assert!(t.contains("img_size") && t.contains("1×28×28"), "{t}");
    // Nothing is created before config, data and model are known to fit.
    assert!(!o.status.success() && !dir.path().join("tiny").exists());
    // An output directory that cannot be created is named.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = train(&cfg, &file, &[]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("a-file"), "{t}");
    // A bare name is looked up in experiments/.
    let o = tarflow(&["train", "--config", "quickstart", "--check"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn bf16_training_runs_with_f32_master_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let o = train(
        &cfg,
        dir.path(),
        &["train.dtype=bf16", "train.max_steps=8", "eval.every=0"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let l = losses(&dir.path().join("tiny"));
    assert_eq!(l.len(), 8);
    assert!(
        l.iter().all(|x| x.1.is_finite()) && l[7].1 < l[0].1,
        "{l:?}"
    );
}

#[test]
fn every_shipped_experiment_config_is_valid() {
    let mut n = 0;
    for e in std::fs::read_dir("experiments").unwrap() {
        let p = e.unwrap().path();
        // `ae-*.toml` are `tarflow train-ae`'s (tests/autoencoder.rs checks them).
        let ae = p
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("ae-"));
        if p.extension().is_some_and(|x| x == "toml") && !ae {
            tarflow::train::TrainConfig::load(p.to_str().unwrap(), &[])
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "{n} configs");
}

#[test]
fn a_starflow_model_trains_and_samples_with_its_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let sets = [
        "model.layers=[1, 2]",
        "model.permutation=starflow",
        "model.scale=softplus",
        "model.sos=true",
        "model.final_norm=true",
        "model.cond_deep_only=true",
        "optim.latent_norm=1e-4",
        "train.max_steps=12",
        "eval.every=0",
    ];
    let o = train(&cfg, dir.path(), &sets);
    assert!(o.status.success(), "{}", text(&o));
    let l = losses(&dir.path().join("tiny"));
    assert!(l[11].1 < l[0].1, "{l:?}");
    let run = dir.path().join("tiny");
    let out = dir.path().join("s.png");
    let o = tarflow(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--num",
        "4",
        "--labels",
        "0,1,2,3",
        "--guidance",
        "2",
        "--guidance-rule",
        "gaussian",
        "--guide-blocks",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&tarflow(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--guidance-rule",
        "cubic",
    ]));
    // A ValueEnum: clap names the bad value and the choices.
    assert!(t.contains("cubic") && t.contains("linear, gaussian"), "{t}");
}

#[test]
fn an_experiment_trains_its_variants_once_and_writes_results() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let exp = dir.path().join("exp.toml");
    std::fs::write(
        &exp,
        format!(
            r#"name = "tiny-ablation"
base = {:?}
set = ["train.max_steps=10", "eval.every=0", "eval.sample_every=0", "data.val_count=200"]
fd_samples = 50
[grid]
"model.num_blocks" = [1, 2]
[[sampling]]
name = "plain"
[[sampling]]
name = "w=2 gaussian"
guidance = 2.0
rule = "gaussian"
"#,
            cfg.display().to_string()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tarflow"));
        c.current_dir(dir.path())
            .env("RAYON_NUM_THREADS", "1")
            .env("TARFLOW_TRACE_DEVICE", "1");
        c.args(["experiment", exp.to_str().unwrap()]).args(extra);
        c.output().unwrap()
    };
    let o = run(&["--dry-run"]);
    assert!(
        o.status.success() && text(&o).contains("model.num_blocks=2"),
        "{}",
        text(&o)
    );
    let o = run(&[]);
    assert!(o.status.success(), "{}", text(&o));
    // Two trainings (four result rows), one device selection for the whole experiment.
    let selections = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.starts_with("device selection #"))
        .count();
    assert_eq!(selections, 1, "{}", text(&o));
    let res = dir.path().join("experiments/results/tiny-ablation");
    let md = std::fs::read_to_string(res.join("results.md")).unwrap();
    assert_eq!(md.matches("| model.num_blocks=").count(), 4, "{md}");
    assert!(
        md.contains("w=2 gaussian") && md.contains("not Inception FID"),
        "{md}"
    );
    let csv = std::fs::read_to_string(res.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(
        csv.starts_with("variant,seed,sampling,params,val_bpd,fd,non_finite"),
        "{csv}"
    );
    for f in [
        "plots/val_bpd.png",
        "plots/fd.png",
        "plots/loss.png",
        "grids/model.num_blocks_1-s0.png",
    ] {
        assert!(res.join(f).is_file(), "missing {f}");
    }
    // A second run skips the finished variants.
    let o = run(&[]);
    assert!(
        o.status.success() && text(&o).matches("skipped").count() == 2,
        "{}",
        text(&o)
    );
    // A bad override in one variant is named before anything runs.
    std::fs::write(
        &exp,
        std::fs::read_to_string(&exp)
            .unwrap()
            .replace("[1, 2]", "[1, 0]"),
    )
    .unwrap();
    let o = run(&["--dry-run"]);
    assert!(
        !o.status.success() && text(&o).contains("num_blocks"),
        "{}",
        text(&o)
    );
}

#[test]
fn every_shipped_ablation_is_valid() {
    use tarflow::experiment::{dry_run, Experiment};
    let mut n = 0;
    for e in std::fs::read_dir("experiments/ablations").unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let e = Experiment::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let runs = dry_run(&e, std::path::Path::new("runs/x"))
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!runs.is_empty());
            n += 1;
        }
    }
    assert!(n >= 16, "{n} ablation files (8 CPU + 8 ImageNet-64)");
}

#[test]
fn jacobi_sampling_of_a_trained_model_matches_sequential() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let o = train(&cfg, dir.path(), &["train.max_steps=30", "eval.every=0"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("tiny");
    let get = |solver: &str, extra: &[&str]| {
        let t = dir.path().join(format!("{solver}.safetensors"));
        let g = dir.path().join("g.png");
        let mut args = vec![
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--num",
            "8",
            "--labels",
            "random",
            "--seed",
            "3",
            "--solver",
            solver,
            "--out",
            g.to_str().unwrap(),
            "--out-tensor",
            t.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = tarflow(&args);
        assert!(o.status.success(), "{}", text(&o));
        let s = candle_core::safetensors::load(&t, &candle_core::Device::Cpu).unwrap();
        (
            s["samples"].clone(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for extra in [vec![], vec!["--guidance", "2"]] {
        let (a, _) = get("sequential", &extra);
        let mut jx = extra.clone();
        jx.extend(["--chunk", "4,0"]);
        let (b, log) = get("jacobi", &jx);
        let what = format!("{extra:?}");
        assert_abs_diff_eq!(
            common::values(&a).named(what),
            common::values(&b),
            epsilon = 1e-3
        );
        assert!(
            log.contains("jacobi block 1") && log.contains("toughness"),
            "{log}"
        );
    }
}

#[test]
fn fd_is_reproducible_and_reports_its_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), TINY);
    let o = train(
        &cfg,
        dir.path(),
        &["train.max_steps=20", "eval.every=0", "data.val_count=300"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("tiny");
    let fd = |cls: &str| {
        let c = dir.path().join(cls);
        let o = tarflow(&[
            "fd",
            "--checkpoint",
            run.to_str().unwrap(),
            "--num",
            "100",
            "--json",
            "--classifier",
            c.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        v
    };
    let (a, b) = (fd("c1.safetensors"), fd("c2.safetensors"));
    assert_eq!(a["fd"], b["fd"], "a retrained classifier gives the same FD");
    assert!(a["fd"].as_f64().unwrap() > 0.0);
    assert!(a["classifier_accuracy"].as_f64().unwrap() > 0.3, "{a}");
    assert!(
        a["features"].as_str().unwrap().contains("classifier"),
        "{a}"
    );
}
