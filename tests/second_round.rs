//! What a new user hit in the second round, through the binary: a folder with one bad image, a
//! resume of a finished run, `info --checkpoint`, samples of a trained run that looked worse
//! than its training grid, and a label list laid out as a 4×3 grid.

mod common;

use common::{tarflow, text, train, TINY};
use std::path::{Path, PathBuf};

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn digit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/mnist-samples")
        .join(name)
}

/// A folder of two digits, a text file named like a PNG and a CSV.
fn folder_with_bad_files(dir: &Path) -> PathBuf {
    let d = dir.join("imgs/digits");
    std::fs::create_dir_all(&d).unwrap();
    for n in ["test-0000-label-7.png", "test-0001-label-2.png"] {
        std::fs::copy(digit(n), d.join(n)).unwrap();
    }
    std::fs::write(d.join("x.png"), "not a picture").unwrap();
    dir.join("imgs")
}

/// A tiny run trained for `steps` steps with Gaussian noise σ = 0.1 and a grid at the end.
fn tiny_run(dir: &Path, steps: u32) -> PathBuf {
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let sets = [
        "train.max_steps",
        "train.checkpoint_every",
        "eval.sample_every",
        "eval.every",
    ]
    .map(|k| format!("{k}={steps}"));
    let o = train(&cfg, dir, &sets.each_ref().map(String::as_str));
    assert!(o.status.success(), "{}", text(&o));
    dir.join("tiny")
}

#[test]
fn one_unreadable_file_is_reported_and_the_rest_scored() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = folder_with_bad_files(dir.path());
    let summary = dir.path().join("s.json");
    let o = tarflow(&[
        "score",
        imgs.to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(out(&o).matches("bits/dim\n").count(), 2, "{}", text(&o));
    let e = err(&o);
    assert!(
        e.contains("skipped") && e.contains("x.png") && e.contains("Invalid PNG signature"),
        "{e}"
    );
    assert!(e.contains("1 unreadable file(s) skipped"), "{e}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["count"], 2);
    assert_eq!(s["skipped"].as_array().unwrap().len(), 1, "{s}");
    // --strict stops at it; a dataset folder skips it the same way; nothing readable fails.
    let o = tarflow(&["score", imgs.to_str().unwrap(), "--strict"]);
    assert!(
        !o.status.success() && err(&o).contains("x.png"),
        "{}",
        text(&o)
    );
    let o = tarflow(&[
        "score",
        "--source",
        "folder",
        "--path",
        imgs.to_str().unwrap(),
    ]);
    assert!(
        o.status.success() && err(&o).contains("skipped") && err(&o).contains("2 image(s) scored"),
        "{}",
        text(&o)
    );
    let o = tarflow(&["classify", "--data", &format!("folder:{}", imgs.display())]);
    assert!(
        o.status.success() && err(&o).contains("x.png"),
        "{}",
        text(&o)
    );
    let csv = dir.path().join("y.csv");
    std::fs::write(&csv, "a,b\n").unwrap();
    let o = tarflow(&["score", csv.to_str().unwrap()]);
    let e = err(&o);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        e.contains("(.csv)") && e.contains("expected png") && !e.contains("`.\""),
        "{e}"
    );
}

#[test]
fn resuming_a_finished_run_changes_nothing_and_says_how_to_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), 4);
    let metrics = run.join("metrics.jsonl");
    let before = std::fs::read(&metrics).unwrap();
    let o = tarflow(&["train", "--resume", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        out(&o).contains("already finished") && out(&o).contains("--set train.max_steps="),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(&metrics).unwrap(),
        before,
        "metrics.jsonl was rewritten"
    );
    // Going on appends: every byte written before stays as it was.
    let o = tarflow(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "train.max_steps=6",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let after = std::fs::read(&metrics).unwrap();
    assert!(after.len() > before.len() && after.starts_with(&before));
}

#[test]
fn info_takes_checkpoint_as_every_command_does() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), 2);
    let o = tarflow(&["info", "--checkpoint", run.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out(&o).contains("\"num_classes\":10"), "{}", text(&o));
}

#[test]
fn a_gaussian_noise_run_samples_denoised_and_redraws_its_training_grid() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), 4);
    let png = dir.path().join("s.png");
    let sample = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = tarflow(&args);
        assert!(o.status.success(), "{}", text(&o));
        err(&o)
    };
    let e = sample(&["--num", "2"]);
    assert!(
        e.contains("settings:") && e.contains("denoised (σ 0.1"),
        "{e}"
    );
    assert!(sample(&["--num", "2", "--no-denoise"]).contains("not denoised"));
    // --like-training: the very pixels of the run's own grid.
    sample(&["--like-training"]);
    let a = image::open(&png).unwrap().to_rgb8();
    let b = image::open(run.join("samples/step-0000004.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    assert!(a.as_raw() == b.as_raw(), "the redrawn grid differs");
    // A label list is one row per pass through it, not a 4×3 grid with two empty cells.
    let e = sample(&["--labels", "0,1,2,3,4,5,6,7,8,9", "--num", "10"]);
    assert!(e.contains("grid 10 per row"), "{e}");
    let g = image::open(&png).unwrap();
    assert!(g.width() > 8 * g.height(), "{}×{}", g.width(), g.height());
    sample(&["--labels", "0,1", "--num", "4", "--cols", "4"]);
    let g = image::open(&png).unwrap();
    assert!(g.width() > 3 * g.height(), "{}×{}", g.width(), g.height());
}
