//! Latent flows end to end: `vae encode` once, a `latents` source whose batches draw from the
//! posterior, a flow trained on them whose bits/dim are the continuous latent density's, grids
//! and `sample` decoded by the run's autoencoder, a decoder fine-tuned on noisy latents standing
//! in for the score step, and the pixel images FD compares a latent run with.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{tarflow, text};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tarflow::datasets::loader::Loader;
use tarflow::datasets::transform::{Noise, Transform};
use tarflow::flows::autoencoder::Autoencoder;

const AE: &str = "models/ae-mnist/vae";

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `vae encode` of the shipped autoencoder over `source` (extra arguments) into `out`.
fn encode(out: &Path, source: &[&str]) {
    let mut args = vec!["vae", "encode", "--vae", AE, "-o", out.to_str().unwrap()];
    args.extend_from_slice(source);
    let o = tarflow(&args);
    assert!(o.status.success(), "{}", text(&o));
}

/// Writes a latents file by hand: `mean`, `std` (N, C, h, w) and `meta` over the defaults.
fn latents_file(path: &Path, mean: &Tensor, std: &Tensor, meta: &[(&str, &str)]) {
    let mut m: HashMap<String, String> = [
        ("format", "tarflow-latents/1"),
        ("scaling_factor", "0.5"),
        ("vae_sha256", "0"),
        ("vae", "hand-made"),
        ("data", "test"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in meta {
        m.insert(k.to_string(), v.to_string());
    }
    let t = [("mean", mean.clone()), ("std", std.clone())];
    let bytes = safetensors::serialize(t.iter().map(|(k, v)| (*k, v)), Some(m)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A `latents` set's batches are posterior draws scaled by the scaling factor, plus the
/// Gaussian training noise: with std 0 and no noise exactly `mean × 0.5`; with std 1 their
/// spread is `0.5` (the scaled posterior's), with σ = 0.3 noise √(0.25 + 0.09).
#[test]
fn latent_batches_draw_from_the_scaled_posterior() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, c, h) = (64usize, 4usize, 3usize);
    let mean = common::random_images(n, c, h, 7);
    let spread = |std: f32, noise: Noise| -> (Vec<f32>, f64) {
        let p = tmp.path().join("l.safetensors");
        let sd = (mean.ones_like().unwrap() * std as f64).unwrap();
        latents_file(&p, &mean, &sd, &[]);
        let set = tarflow::datasets::latents::read_latents(&p).unwrap();
        assert_eq!((set.len(), set.channels, set.height), (n, c, h));
        let t = Transform {
            noise,
            ..Default::default()
        };
        let l = Loader::new(Arc::new(set), None, n, 3, t, false);
        let b = l.make_batch(&l.epoch_order(0), 0, 0);
        let m = mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d: Vec<f64> = b
            .images
            .iter()
            .zip(&m)
            .map(|(x, m)| (*x - m * 0.5) as f64)
            .collect();
        let sd = (d.iter().map(|v| v * v).sum::<f64>() / d.len() as f64).sqrt();
        (b.images, sd)
    };
    let (_, sd) = spread(0.0, Noise::None);
    assert!(sd < 1e-7, "std 0, no noise: off by {sd}");
    let (_, sd) = spread(1.0, Noise::None);
    assert!((sd - 0.5).abs() < 0.03, "posterior spread {sd}, want 0.5");
    let (_, sd) = spread(1.0, Noise::Gaussian(0.3));
    let want = (0.25f64 + 0.09).sqrt();
    assert!((sd - want).abs() < 0.03, "with noise {sd}, want {want}");
}

/// A file that is not `vae encode`'s is refused with its name and what was expected.
#[test]
fn bad_latents_files_name_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.safetensors");
    let m = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let read = |meta: &[(&str, &str)], std: &Tensor| {
        latents_file(&p, &m, std, meta);
        tarflow::datasets::latents::read_latents(&p)
            .unwrap_err()
            .to_string()
    };
    let e = read(&[("format", "other/9")], &m);
    assert!(
        e.contains("bad.safetensors") && e.contains("tarflow-latents/1"),
        "{e}"
    );
    let e = read(
        &[],
        &Tensor::zeros((2, 4, 3, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(e.contains("`std` has shape"), "{e}");
    let nan = (m.ones_like().unwrap() * f64::NAN).unwrap();
    let e = read(&[], &nan);
    assert!(e.contains("not finite"), "{e}");
    // Latents are no images: pixel consumers say so.
    let good = tmp.path().join("good.safetensors");
    latents_file(&good, &m, &m, &[]);
    let o = tarflow(&[
        "data",
        "inspect",
        "--source",
        "latents",
        "--path",
        &s(&good),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("not images"),
        "{}",
        text(&o)
    );
}

/// A training config over latents: its errors name the key and the fix.
#[test]
fn latent_configs_are_checked() {
    let base = std::fs::read_to_string("experiments/starflow-latent-mnist.toml").unwrap();
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        tarflow::train::TrainConfig::from_toml(&base, "starflow-latent-mnist.toml", &sets)
    };
    load(&[]).unwrap();
    let e = load(&["data.noise=\"uniform\""]).unwrap_err().to_string();
    assert!(e.contains("data.noise") && e.contains("gaussian"), "{e}");
    let quick = std::fs::read_to_string("experiments/quickstart.toml").unwrap();
    let e = tarflow::train::TrainConfig::from_toml(
        &quick,
        "quickstart.toml",
        &["data.vae=\"models/ae-mnist/vae\"".to_string()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("data.vae") && e.contains("latents"), "{e}");
    let no_vae = base.replace("vae = \"models/ae-mnist/vae\"\n", "");
    let e = tarflow::train::TrainConfig::from_toml(&no_vae, "x.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.vae") && e.contains("missing"), "{e}");
}

/// The arguments that shrink `starflow-latent-mnist` to a few seconds, over `latents`.
fn tiny_latent_run(latents: &Path, dir: &Path, name: &str, extra: &[&str]) -> std::process::Output {
    let sets = [
        format!("data.path=\"{}\"", latents.display()),
        "model.channels=32".into(),
        "model.num_blocks=2".into(),
        "model.layers=[1, 1]".into(),
        "model.head_dim=16".into(),
        "train.max_steps=4".into(),
        "train.batch_size=8".into(),
        "train.checkpoint_every=4".into(),
        "data.val_count=16".into(),
        "eval.every=4".into(),
        "eval.batches=2".into(),
        "eval.sample_every=4".into(),
        "eval.num_samples=4".into(),
        format!("output.dir=\"{}\"", dir.display()),
        format!("output.name=\"{name}\""),
    ];
    let mut args = vec![
        "train",
        "--config",
        "experiments/starflow-latent-mnist.toml",
    ];
    for s in &sets {
        args.extend_from_slice(&["--set", s]);
    }
    args.extend_from_slice(extra);
    tarflow(&args)
}

/// From the CLI: encode digits, train a latent flow, and get pictures: the run says its bits/dim
/// are latent ones, its grid and `sample` are 28×28 digits decoded by the run's autoencoder (no
/// --vae needed), `--denoise decoder` wants a fine-tuned decoder and says how to make one, and
/// latents from another autoencoder are refused by name.
#[test]
fn a_latent_flow_trains_samples_and_decodes_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let lat = tmp.path().join("lat.safetensors");
    encode(&lat, &["--source", "embedded", "--limit", "96"]);
    let o = tiny_latent_run(&lat, tmp.path(), "lat", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("validation") && out.contains("latent bits/dim"),
        "{out}"
    );
    let run = tmp.path().join("lat");
    let grid = image::open(run.join("samples/step-0000004.png")).unwrap();
    // 4 decoded 28×28 digits in a 2×2 grid (cells and borders): wider than latents would be.
    assert!(
        grid.width() >= 2 * 28,
        "grid {}×{}",
        grid.width(),
        grid.height()
    );
    let dir = tmp.path().join("pics");
    let png = tmp.path().join("s.png");
    let sample = |extra: &[&str]| {
        let mut a = vec![
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--num",
            "2",
            "--out",
            png.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        tarflow(&a)
    };
    let o = sample(&["--out-dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let one = image::open(dir.join("sample-00000.png")).unwrap();
    assert_eq!((one.width(), one.height()), (28, 28));
    let o = sample(&["--denoise", "decoder"]);
    assert!(
        !o.status.success() && text(&o).contains("train-ae"),
        "{}",
        text(&o)
    );
    let o = sample(&["--denoise", "decoder", "--vae", AE]);
    assert!(
        !o.status.success() && text(&o).contains("plain autoencoder"),
        "{}",
        text(&o)
    );
    // The shipped fine-tuned decoder decodes the raw samples; no score step is taken.
    let o = sample(&[
        "--denoise",
        "decoder",
        "--vae",
        "models/ae-mnist-denoiser/vae",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("denoised by the fine-tuned decoder"),
        "{}",
        text(&o)
    );
    // Scoring a digit file encodes it by the run's autoencoder and says what the figure is.
    let o = tarflow(&[
        "score",
        "data/mnist-samples/test-0000-label-7.png",
        "--checkpoint",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("not comparable with pixel bits/dim") && text(&o).contains("bits/dim"),
        "{}",
        text(&o)
    );
    // The same latents checked against another autoencoder.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(Path::new(AE).join(f), other.join(f)).unwrap();
    }
    let w = other.join("diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let vae = format!("data.vae=\"{}\"", other.display());
    let o = tiny_latent_run(&lat, tmp.path(), "other", &["--set", &vae]);
    assert!(
        !o.status.success() && text(&o).contains("re-encode"),
        "{}",
        text(&o)
    );
}

/// The whole latent pipeline on candle's composed ops, the path CUDA and Metal run (the
/// autoencoder has no other): training says it ran composed, and its grid, `sample` and `score`
/// of an image file go through with the CPU kernels off.
#[test]
fn the_latent_pipeline_runs_on_the_composed_ops() {
    let tmp = tempfile::tempdir().unwrap();
    let lat = tmp.path().join("lat.safetensors");
    encode(
        &lat,
        &["--source", "embedded", "--limit", "48", "--composed"],
    );
    let o = tiny_latent_run(&lat, tmp.path(), "c", &["--composed"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(composed ops)"), "{}", text(&o));
    let run = tmp.path().join("c");
    assert!(run.join("samples/step-0000004.png").is_file());
    let png = tmp.path().join("s.png");
    let o = tarflow(&[
        "--composed",
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--num",
        "2",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success() && png.is_file(), "{}", text(&o));
    let o = tarflow(&[
        "--composed",
        "score",
        "data/mnist-samples/test-0001-label-2.png",
        "--checkpoint",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

/// Held-out bits/dim of latents are the continuous density's: the trainer's validation figure
/// equals `score --tensors`' exact NLL of the same (noise-free, std-0) latents, and lies
/// log₂128 = 7 bits/dim below the 8-bit convention on the same outputs.
#[test]
fn latent_validation_is_the_continuous_density() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg: tarflow::ModelConfig = toml::from_str(
        "in_channels = 4\nimg_size = 4\npatch_size = 1\nchannels = 32\nnum_blocks = 2\nlayers_per_block = 1\nhead_dim = 16\n",
    )
    .unwrap();
    let model = common::random_checkpoint(&cfg, 3)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let mean = common::random_images(8, 4, 4, 5);
    let p = tmp.path().join("l.safetensors");
    latents_file(&p, &mean, &mean.zeros_like().unwrap(), &[]);
    let set = tarflow::datasets::latents::read_latents(&p).unwrap();
    let l = Loader::new(Arc::new(set), None, 8, 0, Transform::default(), false);
    let (val, _) = tarflow::train::evaluate::val_bpd(&model, &l, 0)
        .unwrap()
        .unwrap();
    let x = (&mean * 0.5).unwrap();
    let scores = tarflow::sample::tensors::score_tensors(&model, &x, None, 8).unwrap();
    let exact = scores.iter().map(|s| s.bits_per_dim).sum::<f64>() / 8.0;
    approx::assert_abs_diff_eq!(val, exact, epsilon = 1e-4);
    let out = model.forward(&x, tarflow::Cond::Null).unwrap();
    let discrete = model
        .bits_per_dim(&out, tarflow::flows::BpdConvention::TrueDims)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    approx::assert_abs_diff_eq!(discrete - val, 7.0, epsilon = 1e-3);
}

/// `train-ae` with `[finetune]` trains the decoder side only: the encoder's tensors and the
/// scaling factor are the base's, byte for byte; the decoder's moved; the folder records σ and
/// the base; and decoding noisy held-out latents got better (PSNR before → after).
#[test]
fn the_decoder_fine_tune_keeps_the_encoder_and_learns_the_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tarflow(&[
        "train-ae",
        "--config",
        "experiments/ae-mnist-denoiser.toml",
        "--set",
        "train.steps=6",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.lr=1e-3",
        "--set",
        "data.val_count=64",
        "--set",
        &format!("output.dir=\"{}\"", tmp.path().display()),
        "--set",
        "output.name=\"ft\"",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("before →"), "{}", text(&o));
    let dir = tmp.path().join("ft/vae");
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("diffusion_pytorch_model.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let (base, ft) = (load(Path::new(AE)), load(&dir));
    assert_eq!(base.len(), ft.len());
    let mut moved = 0;
    for (k, t) in &base {
        let same = t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == ft[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if k.starts_with("encoder.") || k.starts_with("quant_conv.") {
            assert!(same, "{k} changed");
        } else if !same {
            moved += 1;
        }
    }
    assert!(moved > 10, "only {moved} decoder tensors moved");
    let v = Autoencoder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let b = Autoencoder::load(Path::new(AE), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(v.config.scaling_factor, b.config.scaling_factor);
    let ft = v.finetune.expect("denoiser.json");
    assert_eq!(ft.noise_std, 0.3);
    assert_eq!(ft.base_sha256, b.checksum);
    // [model] and [finetune] together are refused.
    let o = tarflow(&[
        "train-ae",
        "--config",
        "experiments/ae-mnist-denoiser.toml",
        "--set",
        "model.block_out_channels=[8]",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("leave [model] out"),
        "{}",
        text(&o)
    );
}

/// FD compares a latent run with the pixels its latents encode: the pixel twin of a config over
/// a whole encoded source reads that source at the autoencoder's image size and holds out the
/// same images; latents of loose files cannot say which images they were.
#[test]
fn a_latent_run_is_compared_with_the_images_it_encodes() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole.safetensors");
    encode(
        &whole,
        &["--source", "folder", "--path", "data/mnist-samples"],
    );
    let base = std::fs::read_to_string("experiments/starflow-latent-mnist.toml").unwrap();
    let cfg = |p: &PathBuf| {
        tarflow::train::TrainConfig::from_toml(
            &base,
            "x.toml",
            &[format!("data.path=\"{}\"", p.display())],
        )
        .unwrap()
    };
    let twin = tarflow::latent::pixel_twin(&cfg(&whole)).unwrap();
    assert_eq!(twin.data.source.name(), "folder");
    assert_eq!(
        twin.data.path.as_deref(),
        Some(Path::new("data/mnist-samples"))
    );
    assert_eq!((twin.model.in_channels, twin.model.img_size), (1, 28));
    assert!(twin.data.vae.is_none());
    let files = tmp.path().join("files.safetensors");
    encode(
        &files,
        &["data/mnist-samples/test-0000-label-7.png", "--size", "28"],
    );
    let e = tarflow::latent::pixel_twin(&cfg(&files))
        .unwrap_err()
        .to_string();
    assert!(e.contains("re-encode a whole source"), "{e}");
}
