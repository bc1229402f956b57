//! End-to-end tests of the `tarflow` binary.

mod common;

use approx::{assert_abs_diff_eq, assert_abs_diff_ne};
use common::values;

use common::fixture;
use std::process::Command;

fn tarflow(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tarflow"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn import_then_info_describes_the_reference_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small.safetensors");
    let src = fixture("tarflow-small/model.safetensors");
    let (ok, stdout, stderr) = tarflow(&[
        "import",
        src.to_str().unwrap(),
        "--img-size",
        "16",
        "--patch-size",
        "4",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1.67 M parameters"), "{stdout}");
    let (ok, stdout, stderr) = tarflow(&["info", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["num_params"], 1_674_112);
    assert_eq!(v["config"]["channels"], 128);
    assert_eq!(v["config"]["num_classes"], 10);
    // The saved checkpoint reloads to the same numbers as the imported weights.
    let a = tarflow::Checkpoint::load(&out, &candle_core::Device::Cpu).unwrap();
    let b = tarflow::Checkpoint::import(&src, 16, 4, None, &candle_core::Device::Cpu).unwrap();
    for (k, t) in &b.tensors {
        assert_eq!(values(t), values(&a.tensors[k]), "{k}");
    }
    // No temporary file is left behind by the atomic write.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn bad_files_fail_with_a_message_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pth");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let (ok, _, stderr) = tarflow(&[
        "import",
        bad.to_str().unwrap(),
        "--img-size",
        "16",
        "--patch-size",
        "4",
        "-o",
        "x.safetensors",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.pth") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let (ok, _, stderr) = tarflow(&["info", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.pth") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let (ok, _, stderr) = tarflow(&[
        "info",
        fixture("tarflow-small/model.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("tarflow import"), "{stderr}");
}

#[test]
fn pth_and_safetensors_state_dicts_import_to_the_same_model() {
    // tests/fixtures/tiny-pth/make.py writes one state_dict in both formats; the .pth is a
    // PyTorch zip pickle (OrderedDict of _rebuild_tensor_v2 with persistent storages).
    use candle_core::{DType, Device};
    let pth = fixture("tiny-pth/tiny.pth");
    let st = fixture("tiny-pth/tiny.safetensors");
    let a = tarflow::Checkpoint::import(&pth, 8, 2, None, &Device::Cpu).unwrap();
    let b = tarflow::Checkpoint::import(&st, 8, 2, None, &Device::Cpu).unwrap();
    let c = &a.config;
    assert_eq!(
        (
            c.in_channels,
            c.img_size,
            c.patch_size,
            c.channels,
            c.num_classes
        ),
        (1, 8, 2, 64, 3)
    );
    assert_eq!(c.layers, Some(vec![1, 2]), "per-block depths inferred");
    assert_eq!(a.config, b.config);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &b.tensors {
        assert_eq!(values(t), values(&a.tensors[k]), "{k}");
    }
    let x = common::random_images(2, 1, 8, 4);
    let za = a
        .model(&Device::Cpu, DType::F32)
        .unwrap()
        .forward(&x, tarflow::Cond::Labels(&[0, 2]))
        .unwrap();
    let m = b.model(&Device::Cpu, DType::F32).unwrap();
    let zb = m.forward(&x, tarflow::Cond::Labels(&[0, 2])).unwrap();
    assert_eq!(values(&za.z), values(&zb.z));
    assert_abs_diff_ne!(
        values(&za.z),
        values(&tarflow::flows::patch::patchify(&x, 2).unwrap()),
        epsilon = 1e-3
    );

    // And through the CLI, with the wrapped-state_dict and info paths.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.safetensors");
    let (ok, stdout, stderr) = tarflow(&[
        "import",
        pth.to_str().unwrap(),
        "--img-size",
        "8",
        "--patch-size",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1×8×8") && stdout.contains("2 blocks"),
        "{stdout}"
    );
    let (ok, stdout, _) = tarflow(&["info", out.to_str().unwrap()]);
    assert!(ok && stdout.contains("[1, 2]"), "{stdout}");
}

#[test]
fn data_inspect_reports_the_embedded_default_and_writes_a_grid() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.png");
    let (ok, stdout, stderr) = tarflow(&[
        "data",
        "inspect",
        "--source",
        "embedded",
        "--json",
        "--grid",
        grid.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (
            v["count"].as_u64(),
            v["channels"].as_u64(),
            v["height"].as_u64()
        ),
        (Some(10_000), Some(1), Some(28))
    );
    assert_eq!(
        (
            v["num_classes"].as_u64(),
            v["label_min"].as_i64(),
            v["label_max"].as_i64()
        ),
        (Some(10), Some(0), Some(9))
    );
    assert_abs_diff_eq!(v["mean"].as_f64().unwrap(), 33.44, epsilon = 0.01);
    let png = std::fs::read(&grid).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let npz = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/tests/fixtures/val_data.npz");
    let (ok, stdout, stderr) = tarflow(&[
        "data",
        "inspect",
        "--source",
        "imagenet-npz",
        "--path",
        npz.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("\"count\":4") && stdout.contains("\"height\":64"),
        "{stdout}"
    );
    let (ok, _, stderr) = tarflow(&["data", "inspect", "--source", "pictures"]);
    assert!(
        // clap lists the kinds (a ValueEnum): the bad value and the choices are named.
        !ok && stderr.contains("pictures") && stderr.contains("imagenet-npz, hdf5, folder"),
        "{stderr}"
    );
    let (ok, _, stderr) = tarflow(&[
        "data",
        "inspect",
        "--source",
        "cifar10",
        "--path",
        "/nonexistent/cifar",
    ]);
    assert!(
        !ok && stderr.contains("/nonexistent/cifar") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn data_inspect_reports_skipped_images_of_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("g.png");
    std::fs::create_dir(dir.path().join("imgs")).unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::copy(
        fixture("../../datasets/tests/fixtures/val_data.npz"),
        imgs.join("not-an-image.png"),
    )
    .unwrap();
    // A real PNG: the grid the first command writes.
    let (ok, _, stderr) = tarflow(&["data", "inspect", "--grid", grid.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    std::fs::copy(&grid, imgs.join("digits.png")).unwrap();
    let p = imgs.to_str().unwrap();
    let (ok, _, stderr) = tarflow(&[
        "data", "inspect", "--source", "folder", "--path", p, "--size", "16",
    ]);
    assert!(
        !ok && stderr.contains("not-an-image.png") && stderr.contains("skip_bad"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = tarflow(&[
        "data",
        "inspect",
        "--source",
        "folder",
        "--path",
        p,
        "--size",
        "16",
        "--skip-bad",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("skipped 1 unreadable image(s)") && stderr.contains("not-an-image.png"),
        "{stderr}"
    );
    assert!(stdout.contains("\"count\":1"), "{stdout}");
}

#[test]
fn bench_prints_the_reference_benchmark_figures_as_json() {
    let (ok, stdout, stderr) = tarflow(&["bench", "--config", "tiny", "--iters", "1", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for k in [
        "train_step_s",
        "score_images_per_s",
        "sample16_s",
        "sample16_cfg_s",
        "peak_rss_mib",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    let (ok, _, stderr) = tarflow(&["bench", "--config", "/no/such.toml"]);
    assert!(!ok && stderr.contains("/no/such.toml"), "{stderr}");
}
