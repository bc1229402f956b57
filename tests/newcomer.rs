//! What a new user hits first, through the binary: missing data, a wrong `--resume` folder,
//! a folder of images whose size and classes should be inferred, scoring without a model.

mod common;

use common::{tarflow, text};

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn missing_data_names_the_key_the_layout_and_the_fix_once() {
    let cfg = format!(
        "{}/experiments/tarflow-imagenet64.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("Imagenet64_train_npz");
    let set = format!("data.path={}", missing.display());
    for check in [true, false] {
        let mut args = vec!["train", "--config", &cfg, "--set", &set];
        if check {
            args.push("--check");
        } else {
            args.extend(["--set", "train.max_steps=1"]);
        }
        let o = tarflow(&args);
        assert!(!o.status.success(), "{}", text(&o));
        let e = err(&o);
        for want in [
            "data.path",
            "train_data_batch_1.npz",
            "--set data.path=",
            "no such file",
        ] {
            assert!(e.contains(want), "check {check}: missing {want:?} in {e}");
        }
        assert!(!e.contains("os error"), "the OS error is not repeated: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn resume_of_a_folder_of_runs_lists_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("quickstart");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("config.toml"), "").unwrap();
    let o = tarflow(&["train", "--resume", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let e = err(&o);
    assert!(e.contains("not a run directory"), "{e}");
    assert!(e.contains(&run.display().to_string()), "{e}");
    assert!(e.contains("--resume"), "{e}");
    assert!(!e.contains("No such file"), "{e}");
}

#[test]
fn a_folder_of_class_subfolders_keeps_its_size_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    for (class, n) in [("cat", 2), ("dog", 3)] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        for i in 0..n {
            image::RgbImage::from_pixel(16, 16, image::Rgb([i as u8 * 40, 9, 200]))
                .save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let p = dir.path().to_str().unwrap();
    let o = tarflow(&[
        "data", "inspect", "--source", "folder", "--path", p, "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["count"].as_u64(), v["height"].as_u64()),
        (Some(5), Some(16))
    );
    assert_eq!(v["num_classes"], 2);
    assert!(
        err(&o).contains("2 classes from the sub-folders"),
        "{}",
        text(&o)
    );
    // Flags override the inference, and a resize is said.
    let o = tarflow(&[
        "data",
        "inspect",
        "--source",
        "folder",
        "--path",
        p,
        "--json",
        "--size",
        "8",
        "--no-classes",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["height"].as_u64(), v["num_classes"].as_u64()),
        (Some(8), Some(0))
    );
    assert!(err(&o).contains("resized"), "{}", text(&o));
}

#[test]
fn score_without_a_checkpoint_uses_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("digit.png");
    image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (10..18).contains(&x) && (4..24).contains(&y) {
            255
        } else {
            0
        }])
    })
    .save(&img)
    .unwrap();
    let o = tarflow(&["score", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(err(&o).contains("default model"), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("bits/dim"));
}

#[test]
fn info_takes_a_run_directory_and_defaults_to_the_shipped_model() {
    let run = format!("{}/notebooks/quickstart-run", env!("CARGO_MANIFEST_DIR"));
    let o = tarflow(&["info", &run, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["path"].as_str().unwrap().ends_with("ema.safetensors"),
        "{v}"
    );
    assert_eq!(v["config"]["patch_size"], 7);
    let o = tarflow(&["info"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        err(&o).contains("default model tarflow-mnist-bpd"),
        "{}",
        text(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("1×28×28"));
}
