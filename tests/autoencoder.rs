//! KL autoencoders from diffusers folders against `vae-tiny` (diffusers' `AutoencoderKL` in
//! SD-VAE's layout, random seeded weights, as `save_pretrained` writes it): the posterior's mean
//! and std, and the decoding, on the composed ops (the GPU path: the autoencoder has no CPU
//! engine) in f32 and bf16; both attention key namings; folders that do not fit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, load, tarflow, text};
use std::path::{Path, PathBuf};
use tarflow::flows::autoencoder::{Autoencoder, AutoencoderConfig};

fn vae_dir() -> PathBuf {
    fixture("vae-tiny/vae")
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Encodes the reference inputs and decodes the reference mean in `dtype`; returns the largest
/// errors of mean, std and decoding.
fn errors(dir: &Path, dtype: DType) -> (f64, f64, f64) {
    let vae = Autoencoder::load(dir, &Device::Cpu, dtype).unwrap();
    let inp = load("vae-tiny/inputs.safetensors");
    let exp = load("vae-tiny/expected.safetensors");
    let x = inp["x"].to_dtype(dtype).unwrap();
    let (mean, std) = vae.encode(&x).unwrap();
    let dec = vae.decode(&exp["mean"].to_dtype(dtype).unwrap()).unwrap();
    let err = |a: &Tensor, b: &Tensor| -> f64 {
        (a.to_dtype(DType::F32).unwrap() - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    (
        err(&mean, &exp["mean"]),
        err(&std, &exp["std"]),
        err(&dec, &exp["decoded"]),
    )
}

/// f32: mean and std within 1e-4, the decoding within 1e-3 of diffusers'.
#[test]
fn vae_tiny_encodes_and_decodes_as_diffusers() {
    let (m, s, d) = errors(&vae_dir(), DType::F32);
    assert!(
        m < 1e-4 && s < 1e-4 && d < 1e-3,
        "mean {m:e} std {s:e} decoded {d:e}"
    );
    let cfg = Autoencoder::load(&vae_dir(), &Device::Cpu, DType::F32)
        .unwrap()
        .config;
    assert_eq!(cfg.downsample(), 4);
    assert_eq!(cfg.latent_channels, 4);
    assert_eq!(cfg.scaling_factor, 0.18215);
}

/// Half precision on the composed ops (the GPU path), within the tolerances measured here.
/// candle's CPU matmul has no bf16, so the CPU checks f16 (the same ops, 3 more mantissa
/// bits); bf16 runs on CUDA and Metal only.
#[test]
fn vae_tiny_in_f16_within_measured_tolerances() {
    let (m, s, d) = errors(&vae_dir(), DType::F16);
    eprintln!("f16: mean {m:e} std {s:e} decoded {d:e}");
    assert!(
        m < 5e-3 && s < 5e-3 && d < 1e-2,
        "mean {m:e} std {s:e} decoded {d:e}"
    );
}

/// A copy of the folder with `edit` applied to its config and `rename` to its tensor names.
fn variant(
    dir: &Path,
    edit: impl Fn(&mut serde_json::Value),
    rename: impl Fn(&str) -> Option<String>,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let t = candle_core::safetensors::load(
        vae_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let t: std::collections::HashMap<String, Tensor> = t
        .into_iter()
        .filter_map(|(k, v)| rename(&k).map(|k| (k, v)))
        .collect();
    candle_core::safetensors::save(&t, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// The older key naming of SD-VAE files (`query/key/value/proj_attn`) reads as the current one.
#[test]
fn the_older_attention_key_names_load_the_same_network() {
    let tmp = tempfile::tempdir().unwrap();
    let old = variant(
        &tmp.path().join("old"),
        |_| {},
        |k| {
            Some(
                k.replace(".to_q.", ".query.")
                    .replace(".to_k.", ".key.")
                    .replace(".to_v.", ".value.")
                    .replace(".to_out.0.", ".proj_attn."),
            )
        },
    );
    let (m, s, d) = errors(&old, DType::F32);
    assert!(
        m < 1e-4 && s < 1e-4 && d < 1e-3,
        "mean {m:e} std {s:e} decoded {d:e}"
    );
}

/// Folders that do not fit are errors naming the file and the key.
#[test]
fn bad_folders_name_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |dir: &Path| {
        Autoencoder::load(dir, &Device::Cpu, DType::F32)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // No folder at all.
    let e = load(&tmp.path().join("none"));
    assert!(e.contains("config.json"), "{e}");
    // A missing weights file.
    let dir = tmp.path().join("noweights");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(vae_dir().join("config.json"), dir.join("config.json")).unwrap();
    let e = load(&dir);
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    // An unknown block type.
    let dir = variant(
        &tmp.path().join("attnblock"),
        |c| c["down_block_types"][1] = "AttnDownEncoderBlock2D".into(),
        |k| Some(k.to_string()),
    );
    let e = load(&dir);
    assert!(
        e.contains("down_block_types") && e.contains("config.json"),
        "{e}"
    );
    // A config that does not match the tensors: wider blocks, one level fewer, a missing tensor.
    let dir = variant(
        &tmp.path().join("wider"),
        |c| c["block_out_channels"] = serde_json::json!([64, 64, 64]),
        |k| Some(k.to_string()),
    );
    let e = load(&dir);
    assert!(
        e.contains("has shape") && e.contains("config implies"),
        "{e}"
    );
    let dir = variant(
        &tmp.path().join("fewer"),
        |c| {
            c["block_out_channels"] = serde_json::json!([32, 64]);
            c["down_block_types"] = serde_json::json!(["DownEncoderBlock2D", "DownEncoderBlock2D"]);
            c["up_block_types"] = serde_json::json!(["UpDecoderBlock2D", "UpDecoderBlock2D"]);
        },
        |k| Some(k.to_string()),
    );
    let e = load(&dir);
    assert!(
        e.contains("diffusion_pytorch_model.safetensors")
            && e.contains("has shape")
            && e.contains("config implies"),
        "{e}"
    );
    let dir = variant(
        &tmp.path().join("missing"),
        |_| {},
        |k| (!k.starts_with("decoder.conv_out")).then(|| k.to_string()),
    );
    let e = load(&dir);
    assert!(
        e.contains("decoder.conv_out") && e.contains("missing"),
        "{e}"
    );
    // An unknown config key.
    let dir = variant(
        &tmp.path().join("unknown"),
        |c| c["latent_chanels"] = 4.into(),
        |k| Some(k.to_string()),
    );
    let e = load(&dir);
    assert!(e.contains("latent_chanels"), "{e}");
    let e = AutoencoderConfig::from_json("[1]", Path::new("c.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.json"), "{e}");
}

/// `tarflow vae encode` writes the posterior with the data's and the autoencoder's identity;
/// `tarflow vae decode` turns the mean back into diffusers' decoding, as a tensor or a grid.
#[test]
fn vae_encode_and_decode_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let lat = tmp.path().join("lat.safetensors");
    let o = tarflow(&[
        "vae",
        "encode",
        "--vae",
        &s(&vae_dir()),
        "--tensors",
        &s(&fixture("vae-tiny/inputs.safetensors")),
        "-o",
        &s(&lat),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
    let exp = load("vae-tiny/expected.safetensors");
    assert_close("cli mean", &got["mean"], &exp["mean"], 1e-4, 1e-4);
    assert_close("cli std", &got["std"], &exp["std"], 1e-4, 1e-4);
    let meta = std::fs::read(&lat).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&meta).unwrap();
    let m = m.metadata().clone().unwrap();
    assert_eq!(m["count"], "2");
    assert_eq!(m["vae_sha256"].len(), 64);
    // Decoding the mean: as a tensor, and as a PNG grid.
    let z = tmp.path().join("z.safetensors");
    candle_core::safetensors::save(&[("z", exp["mean"].clone())].into_iter().collect(), &z)
        .unwrap();
    let decode_to = |out: &Path| {
        let o = tarflow(&[
            "vae",
            "decode",
            "--vae",
            &s(&vae_dir()),
            "--tensors",
            &s(&z),
            "-o",
            &s(out),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    };
    let out = tmp.path().join("x.safetensors");
    decode_to(&out);
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_close("cli decoded", &got["x"], &exp["decoded"], 1e-3, 1e-3);
    let png = tmp.path().join("x.png");
    decode_to(&png);
    let img = image::open(&png).unwrap();
    assert!(img.width() >= 64 && img.height() >= 32);
    // A tensor of the wrong name is named.
    let o = tarflow(&[
        "vae",
        "decode",
        "--vae",
        &s(&vae_dir()),
        "--tensors",
        &s(&lat),
        "-o",
        &s(&out),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("`z`"),
        "{}",
        text(&o)
    );
}

/// `tarflow train-ae` writes a diffusers folder that loads back, its held-out PSNR and a grid;
/// the same config and seed give the same weights, byte for byte.
#[test]
fn train_ae_writes_a_folder_that_loads_and_repeats_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let o = tarflow(&[
            "train-ae",
            "--config",
            "experiments/ae-mnist.toml",
            "--set",
            "model.block_out_channels=[8,16]",
            "--set",
            "model.norm_num_groups=8",
            "--set",
            "train.steps=3",
            "--set",
            "train.batch_size=4",
            "--set",
            "data.val_count=8",
            "--set",
            &format!("output.dir=\"{}\"", tmp.path().display()),
            "--set",
            &format!("output.name=\"{name}\""),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("held-out PSNR"), "{}", text(&o));
        tmp.path().join(name)
    };
    let (a, b) = (run("a"), run("b"));
    let vae = Autoencoder::load(&a.join("vae"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(vae.config.downsample(), 2);
    assert_eq!(vae.config.in_channels, 1);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    assert!(summary["val_psnr_db"].as_f64().unwrap().is_finite());
    assert!(a.join("reconstructions.png").is_file());
    let weights =
        |d: &Path| std::fs::read(d.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(weights(&a) == weights(&b), "same seed, different weights");
    // Every shipped autoencoder config parses (`tarflow train` reads the flows' configs).
    let mut shipped = 0;
    for e in std::fs::read_dir("experiments").unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("ae-"))
        {
            let text = std::fs::read_to_string(&p).unwrap();
            tarflow::train::autoencoder::AeConfig::from_toml(&text, p.to_str().unwrap(), &[])
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            shipped += 1;
        }
    }
    assert!(shipped >= 1);
    // An unknown key is named.
    let o = tarflow(&[
        "train-ae",
        "--config",
        "experiments/ae-mnist.toml",
        "--set",
        "train.stpes=3",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("stpes"),
        "{}",
        text(&o)
    );
}

/// The shipped MNIST autoencoder (`models/ae-mnist`, trained by `experiments/ae-mnist.toml`)
/// loads and reconstructs the first 256 embedded digits at its measured quality: 28×28 → 4×7×7,
/// PSNR above 27 dB (27.7 on its 1000 held-out digits).
#[test]
fn the_shipped_mnist_autoencoder_reconstructs_digits() {
    let set = tarflow::datasets::embedded::mnist10k().unwrap();
    let n = 256;
    let set = set.subset(&(0..n).collect::<Vec<_>>());
    let psnr = common::reconstruction_psnr("models/ae-mnist/vae", &set, [4, 7, 7]);
    eprintln!("shipped autoencoder: PSNR {psnr:.2} dB on {n} digits");
    assert!(psnr > 27.0, "PSNR {psnr:.2} dB");
}

/// A latent model's samples decode through `sample --vae DIR`: the imported ml-starflow fixture
/// (4×8×8 latents) with vae-tiny gives 32×32 pictures, each the decoding of its raw sample
/// divided by the scaling factor; `score --tensors` says its bits/dim are latent ones.
#[test]
fn sample_decodes_a_latent_models_samples_with_its_autoencoder() {
    let tmp = tempfile::tempdir().unwrap();
    let f = |n: &str| fixture(&format!("starflow-release/{n}"));
    let ck = tmp.path().join("release.safetensors");
    common::import_starflow_release(&ck);
    let (grid, raw) = (tmp.path().join("g.png"), tmp.path().join("z.safetensors"));
    let sample = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--text",
            f("inputs.safetensors").to_str().unwrap().to_owned().leak(),
            "--num",
            "3",
            "--cols",
            "3",
        ];
        args.extend_from_slice(extra);
        tarflow(&args)
    };
    let dir = tmp.path().join("pictures");
    let o = sample(&[
        "--vae",
        vae_dir().to_str().unwrap(),
        "--out",
        grid.to_str().unwrap(),
        "--out-dir",
        dir.to_str().unwrap(),
        "--out-tensor",
        raw.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(grid.is_file());
    // Each picture is vae-tiny's decoding of its sample / 0.18215, to the 8-bit level.
    let z = candle_core::safetensors::load(&raw, &Device::Cpu).unwrap()["samples"].clone();
    assert_eq!(z.dims(), [3, 4, 8, 8]);
    let vae = Autoencoder::load(&vae_dir(), &Device::Cpu, DType::F32).unwrap();
    let x = vae.decode(&(z / 0.18215).unwrap()).unwrap();
    let want = tarflow::sample::grid::to_u8(&x.get(0).unwrap()).unwrap();
    let got = image::open(dir.join("sample-00000.png")).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), (32, 32));
    let n = 32 * 32;
    let worst = (0..n)
        .flat_map(|i| (0..3).map(move |c| (i, c)))
        .map(|(i, c)| (got.as_raw()[i * 3 + c] as i32 - want[c * n + i] as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "largest difference {worst} levels");
    // Scoring a latent model says what its bits/dim are, and are not.
    let inputs = f("inputs.safetensors");
    let o = tarflow(&[
        "score",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--tensors",
        inputs.to_str().unwrap(),
        "--text",
        inputs.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("not comparable with pixel bits/dim"),
        "{}",
        text(&o)
    );
    // A model without --vae or --out-tensor is told how to get pictures.
    let o = sample(&["--out", grid.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("--vae DIR"),
        "{}",
        text(&o)
    );
}
