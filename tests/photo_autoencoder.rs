//! The colour autoencoder's data and training: `data crops` cuts the shipped photographs into a
//! CIFAR-10 batch, `train-ae` trains on one batch and measures PSNR on a separate held-out one
//! (`data.val_path`), and the shipped `models/ae-photos` reconstructs crops of the photograph
//! it never saw at its measured quality.

mod common;

use candle_core::{DType, Device};
use common::{tarflow, text};
use std::path::Path;
use tarflow::flows::autoencoder::Autoencoder;

fn crops(photos: &[&str], count: &str, seed: &str, out: &Path) {
    let mut args = vec!["data", "crops"];
    args.extend_from_slice(photos);
    args.extend_from_slice(&[
        "--count",
        count,
        "--seed",
        seed,
        "-o",
        out.to_str().unwrap(),
    ]);
    let o = tarflow(&args);
    assert!(o.status.success(), "{}", text(&o));
}

/// `train-ae` over crops with a held-out batch: the summary's held-out images are exactly that
/// batch (count and checksum), and the folder loads back as a 3-channel autoencoder.
#[test]
fn train_ae_holds_out_a_separate_batch_of_photo_crops() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, val) = (tmp.path().join("train.bin"), tmp.path().join("val.bin"));
    crops(
        &["data/photos/chelsea.png", "data/photos/rocket.jpg"],
        "32",
        "0",
        &train,
    );
    crops(&["data/photos/coffee.png"], "8", "1", &val);
    let set = |p: &Path| tarflow::datasets::cifar::read_cifar10(p).unwrap();
    let o = tarflow(&[
        "train-ae",
        "--config",
        "experiments/ae-photos.toml",
        "--set",
        &format!("data.path=\"{}\"", train.display()),
        "--set",
        &format!("data.val_path=\"{}\"", val.display()),
        "--set",
        "model.block_out_channels=[8,16]",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=4",
        "--set",
        &format!("output.dir=\"{}\"", tmp.path().display()),
        "--set",
        "output.name=\"ae\"",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("ae/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["val_count"], 8);
    assert_eq!(summary["val_checksum"], set(&val).checksum());
    let vae = Autoencoder::load(&tmp.path().join("ae/vae"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(vae.config.in_channels, 3);
    // The embedded digits have no separate held-out file: refused by key, before training.
    let o = tarflow(&[
        "train-ae",
        "--config",
        "experiments/ae-photos.toml",
        "--set",
        "data.source=\"embedded\"",
        "--set",
        "train.steps=1",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("data.val_path"),
        "{}",
        text(&o)
    );
}

/// The shipped colour autoencoder reconstructs 64 crops of the held-out photograph (coffee.png,
/// cut as its config says) above 22 dB PSNR (its summary: the measured figure on 500).
#[test]
fn the_shipped_photo_autoencoder_reconstructs_an_unseen_photo() {
    let tmp = tempfile::tempdir().unwrap();
    let val = tmp.path().join("val.bin");
    crops(&["data/photos/coffee.png"], "64", "1", &val);
    let set = tarflow::datasets::cifar::read_cifar10(&val).unwrap();
    let psnr = common::reconstruction_psnr("models/ae-photos/vae", &set, [4, 8, 8]);
    eprintln!("shipped photo autoencoder: PSNR {psnr:.2} dB on 64 held-out crops");
    assert!(psnr > 22.0, "PSNR {psnr:.2} dB");
}
