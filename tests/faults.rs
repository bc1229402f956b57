//! Faults a long run meets: a full disk, a folder that turns read-only, a dataset that vanishes
//! mid-run, a NaN in a batch. Each must be reported with the step and the last good checkpoint,
//! leave no half-written checkpoint and lose nothing already saved.
//!
//! The disk tests mount small tmpfs file systems (root on Linux, as on CI); where mounting is
//! not permitted they say so and skip.

mod common;

use common::{tarflow, text, TINY};
use std::path::{Path, PathBuf};
use std::process::Command;
use tarflow::train::checkpoints::RunDir;

/// A tmpfs mounted for the test's lifetime.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cannot mount a tmpfs here (not root?): skipping");
        }
        ok.then(|| Self(dir.to_path_buf()))
    }

    /// `dir` made read-only in place (a read-only bind mount over itself).
    fn read_only(dir: &Path) -> Option<Self> {
        let run = |args: &[&str]| {
            Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !run(&["--bind"]) {
            eprintln!("cannot bind-mount here (not root?): skipping");
            return None;
        }
        let m = Self(dir.to_path_buf());
        assert!(run(&["-o", "remount,ro,bind"]), "read-only remount");
        Some(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.toml");
    std::fs::write(&p, TINY).unwrap();
    p
}

/// Runs `tarflow train` on `cfg` with its output in `out_dir` and these `--set`s.
fn train(cfg: &Path, out_dir: &Path, sets: &[&str]) -> std::process::Output {
    let out = format!("output.dir={}", out_dir.display());
    let mut args = vec!["train", "--config", cfg.to_str().unwrap(), "--set", &out];
    for s in sets {
        args.extend(["--set", s]);
    }
    tarflow(&args)
}

/// Starts `tarflow train` on `cfg` (output in `out_dir`, these `--set`s) and returns once its
/// first checkpoint exists.
fn train_until_first_checkpoint(cfg: &Path, out_dir: &Path, sets: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tarflow"));
    cmd.env("RAYON_NUM_THREADS", "1")
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--set", &format!("output.dir={}", out_dir.display())])
        .args(["--set", "eval.every=0", "--set", "eval.sample_every=0"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stem = cfg.file_stem().unwrap();
    let t0 = std::time::Instant::now();
    while RunDir::new(out_dir.join(stem)).latest().unwrap().is_none() {
        assert!(t0.elapsed().as_secs() < 60, "no first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child
}

/// Whatever `latest` names loads, and no half-written checkpoint folder is left behind.
fn assert_checkpoints_intact(run: &Path) -> u64 {
    let latest = RunDir::new(run)
        .latest()
        .unwrap()
        .expect("a checkpoint was saved before the fault");
    let r = RunDir::load_checkpoint(&latest, &candle_core::Device::Cpu).unwrap();
    let temp = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .count();
    assert_eq!(
        temp,
        0,
        "a half-written checkpoint was left in {}",
        run.display()
    );
    r.state.step
}

#[test]
fn a_full_disk_stops_with_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // One checkpoint of the tiny model (weights, EMA, two optimizer moments) takes ~1.8 MB.
    let Some(m) = Mount::tmpfs(&dir.path().join("disk"), "size=5m") else {
        return;
    };
    let o = train(
        &cfg,
        &m.0,
        &[
            "train.max_steps=40",
            "train.checkpoint_every=4",
            "train.keep_checkpoints=0",
            "eval.every=0",
            "eval.sample_every=0",
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("No space left on device"), "{t}");
    assert!(
        t.contains("cannot write the checkpoint") && t.contains("The last good checkpoint is"),
        "{t}"
    );
    let run = m.0.join("tiny");
    let step = assert_checkpoints_intact(&run);
    assert!(step >= 4 && step.is_multiple_of(4), "step {step}");
    // Metrics up to the fault are all there and parse.
    let recs = tarflow::train::metrics::read(&run.join("metrics.jsonl")).unwrap();
    assert!(recs.iter().any(|r| r.step == step));
}

#[test]
fn an_output_folder_turning_read_only_mid_run_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let run = dir.path().join("tiny");
    let sets = ["train.max_steps=100000", "train.checkpoint_every=5"];
    let child = train_until_first_checkpoint(&cfg, dir.path(), &sets);
    let Some(ro) = Mount::read_only(&run.join("checkpoints")) else {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    let o = child.wait_with_output().unwrap();
    drop(ro);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("Read-only file system") && t.contains("cannot write the checkpoint"),
        "{t}"
    );
    assert!(t.contains("The last good checkpoint is"), "{t}");
    assert_checkpoints_intact(&run);
    // A read-only output folder at the start is refused before any work, naming it.
    let outdir = dir.path().join("ro");
    std::fs::create_dir_all(&outdir).unwrap();
    let Some(_ro) = Mount::read_only(&outdir) else {
        return;
    };
    let o = train(&cfg, &outdir, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("ro/tiny") && t.contains("Read-only"), "{t}");
}

#[test]
fn a_dataset_vanishing_mid_run_is_harmless_and_named_on_resume() {
    // Images are read into memory when the run starts; deleting them afterwards must not
    // disturb it, and a later resume must name what is gone.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("digits");
    let set = tarflow::datasets::embedded::mnist10k().unwrap();
    for i in 0..96 {
        let cls = data.join(format!("{}", set.label(i).unwrap()));
        std::fs::create_dir_all(&cls).unwrap();
        let img = image::GrayImage::from_raw(28, 28, set.image(i).unwrap().to_vec()).unwrap();
        img.save(cls.join(format!("{i}.png"))).unwrap();
    }
    let text_cfg = TINY.replace(
        "source = \"embedded\"\nval_count = 64",
        &format!(
            "source = \"folder\"\npath = \"{}\"\nval_count = 16",
            data.display()
        ),
    );
    let cfg = dir.path().join("folder.toml");
    std::fs::write(&cfg, text_cfg).unwrap();
    let run = dir.path().join("folder");
    let sets = ["train.max_steps=60", "train.checkpoint_every=5"];
    let child = train_until_first_checkpoint(&cfg, dir.path(), &sets);
    std::fs::remove_dir_all(&data).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(assert_checkpoints_intact(&run), 60);
    let o = tarflow(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "train.max_steps=80",
    ]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("digits"), "{t}");
    assert_eq!(
        assert_checkpoints_intact(&run),
        60,
        "the failed resume changed nothing"
    );
}

#[test]
fn a_nan_in_a_batch_stops_before_touching_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let sets: Vec<String> = [
        format!("output.dir={:?}", dir.path().display().to_string()),
        "train.checkpoint_every=2".into(),
        "eval.every=0".into(),
        "eval.sample_every=0".into(),
    ]
    .into();
    let cfg = tarflow::train::TrainConfig::from_toml(TINY, "tiny", &sets).unwrap();
    let (mut trainer, _) = tarflow::train::Trainer::start(cfg).unwrap();
    trainer.set_batch_hook(Box::new(|step, b| {
        if step == 5 {
            b.images[7] = f32::NAN;
        }
    }));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let e = trainer.run(&stop, &mut |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("step 5") && e.contains("1 NaN/Inf value") && e.contains("step-0000004"),
        "{e}"
    );
    let run = dir.path().join("run");
    assert_eq!(assert_checkpoints_intact(&run), 4);
}

#[test]
fn a_model_too_large_for_memory_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let o = train(
        &cfg,
        dir.path(),
        &["model.channels=65536", "model.num_blocks=64"],
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("GiB available") && t.contains("model"), "{t}");
    assert!(
        !dir.path().join("tiny").exists(),
        "no run directory for a refused run"
    );
    // The estimate behind it agrees with the exact count.
    for c in [
        tarflow::ModelConfig::new(1, 28, 7, 64, 2, 1, 10),
        tarflow::ModelConfig::new(3, 32, 4, 256, 4, 2, 10),
        tarflow::ModelConfig::new(3, 64, 2, 768, 8, 8, 1000),
        // ml-starflow's options change the layers' and the blocks' weights.
        tarflow::ModelConfig {
            swiglu: true,
            num_kv_heads: Some(1),
            rope: true,
            txt_size: 4,
            txt_dim: 512,
            denoiser_layers: 8,
            ..tarflow::ModelConfig::new(4, 32, 1, 256, 4, 2, 0)
        },
    ] {
        let exact = tarflow::flows::params::count_params(&c) as f64;
        let rel = (c.approx_params() - exact).abs() / exact;
        assert!(rel < 0.05, "{c:?}: {} vs {exact}", c.approx_params());
    }
}

#[test]
fn an_optimizer_state_missing_a_moment_is_named_on_resume() {
    // The trainer holds each layer's weights as one packed variable; a saved moment that is
    // missing must still be named by its file and parameter, not by the packed name.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let o = train(
        &cfg,
        dir.path(),
        &["train.max_steps=8", "eval.every=0", "eval.sample_every=0"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("tiny");
    let latest = RunDir::new(&run).latest().unwrap().unwrap();
    let file = latest.join("optimizer.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut state = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let key = "v.blocks.1.attn_blocks.0.mlp.main.2.weight";
    assert!(
        state.remove(key).is_some(),
        "the moments are saved per parameter"
    );
    let kept = safetensors::tensor::serialize(
        state.iter().map(|(k, v)| (k.as_str(), v)),
        meta.metadata().clone(),
    )
    .unwrap();
    std::fs::write(&file, kept).unwrap();
    let o = tarflow(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "train.max_steps=12",
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("optimizer.safetensors") && t.contains(key),
        "the error names the file and the moment: {t}"
    );
}
