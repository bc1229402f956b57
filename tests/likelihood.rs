//! The likelihood protocol end to end: bits/dim of a known Gaussian, scores that stay finite
//! where f32 overflows (recomputed in f64, checked against a brute-force f64 computation), an
//! explicit overflow where even f64 cannot hold the number, and the IW bound's arithmetic.

mod common;

use approx::{abs_diff_eq, assert_abs_diff_eq};
use candle_core::{DType, Device, Tensor};
use common::{tarflow, text};
use std::path::{Path, PathBuf};
use tarflow::sample::score::{score_images, Dequant, ScoreOptions};
use tarflow::{Checkpoint, ModelConfig};

const LN_2PI: f64 = 1.837_877_066_409_345_3;
const LN_128: f64 = 4.852_030_263_919_617;

/// 1×8×8 images, patch 2 (16 tokens of 4 values), 4 blocks of one layer.
fn config() -> ModelConfig {
    serde_json::from_str(
        r#"{"in_channels":1,"img_size":8,"patch_size":2,"channels":32,"num_blocks":4,
            "layers_per_block":1,"head_dim":16,"num_classes":0}"#,
    )
    .unwrap()
}

/// A model whose every block maps token t ≥ 1 (in the block's order) by
/// `z = (x − mu)·e^{−alpha}` with constants: `proj_out` weights zero, bias (alpha, mu).
fn constant_head(alpha: f64, mu: f64, dir: &Path) -> (Checkpoint, PathBuf) {
    let cfg = config();
    let mut ck = Checkpoint::init(&cfg, 0, &Device::Cpu).unwrap();
    let d = cfg.patch_dim();
    for k in 0..cfg.num_blocks {
        let w = format!("blocks.{k}.proj_out.weight");
        let shape = ck.tensors[&w].dims().to_vec();
        ck.tensors
            .insert(w, Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap());
        let bias: Vec<f32> = (0..2 * d)
            .map(|i| if i < d { alpha as f32 } else { mu as f32 })
            .collect();
        ck.tensors.insert(
            format!("blocks.{k}.proj_out.bias"),
            Tensor::from_vec(bias, 2 * d, &Device::Cpu).unwrap(),
        );
    }
    let path = dir.join("model.safetensors");
    ck.save(&path).unwrap();
    (ck, path)
}

/// The exact discrete NLL (no dequantisation) of `pixels` under [`constant_head`], in plain
/// f64 arithmetic: block k passes its first token (canonical 0, or T−1 when it reverses the
/// order) and maps every other one.
fn brute_force_nll(pixels: &[u8], alpha: f64, mu: f64, flipped: &[bool]) -> f64 {
    let (t, d, p, s) = (16usize, 4usize, 2usize, 8usize);
    let mut tok = vec![vec![0f64; d]; t];
    for (i, row) in tok.iter_mut().enumerate() {
        let (gy, gx) = (i / (s / p), i % (s / p));
        for (j, v) in row.iter_mut().enumerate() {
            let (py, px) = (j / p, j % p);
            *v = pixels[(gy * p + py) * s + gx * p + px] as f64 / 127.5 - 1.0;
        }
    }
    let mut minus_logdet = 0.0;
    for &f in flipped {
        let first = if f { t - 1 } else { 0 };
        for (i, row) in tok.iter_mut().enumerate() {
            if i != first {
                for v in row.iter_mut() {
                    *v = (*v - mu) * (-alpha).exp();
                }
                minus_logdet += alpha * d as f64;
            }
        }
    }
    let n = (t * d) as f64;
    let sq: f64 = tok.iter().flatten().map(|v| v * v).sum();
    0.5 * sq + n * (0.5 * LN_2PI + LN_128) + minus_logdet
}

fn save_gray(pixels: &[u8], path: &Path) {
    image::GrayImage::from_raw(8, 8, pixels.to_vec())
        .unwrap()
        .save(path)
        .unwrap();
}

fn digitish(seed: u8) -> Vec<u8> {
    (0..64u32)
        .map(|i| ((i * 37 + seed as u32 * 11) % 256) as u8)
        .collect()
}

fn score_json(ck: &Path, img: &Path, composed: bool) -> Vec<serde_json::Value> {
    let mut args = vec![];
    if composed {
        args.push("--composed");
    }
    args.extend([
        "score",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--dequant",
        "none",
        "--json",
        img.to_str().unwrap(),
    ]);
    let o = tarflow(&args);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!out.contains("null"), "a number became null: {out}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn bits_per_dim_of_the_identity_flow_is_the_gaussian_formula() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ck) = constant_head(0.0, 0.0, dir.path());
    let px = digitish(3);
    let img = dir.path().join("a.png");
    save_gray(&px, &img);
    // α = μ = 0: z = x, so −log p = ½Σx² + n(½ ln 2π + ln 128) per 8-bit bin.
    let want: f64 = px
        .iter()
        .map(|&k| {
            let x = k as f64 / 127.5 - 1.0;
            0.5 * x * x
        })
        .sum::<f64>()
        + 64.0 * (0.5 * LN_2PI + LN_128);
    for composed in [false, true] {
        let r = &score_json(&ck, &img, composed)[0];
        let nll = r["nll_nats"].as_f64().unwrap();
        assert!(
            abs_diff_eq!(nll, want, epsilon = 1e-4 * want),
            "{nll} vs {want}"
        );
        let bpd = r["bits_per_dim"].as_f64().unwrap();
        assert_abs_diff_eq!(bpd, want / (64.0 * std::f64::consts::LN_2), epsilon = 1e-6);
        assert_eq!(r["precision"], "f32");
    }
}

#[test]
fn an_image_that_overflows_f32_scores_finite_and_exact_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    // e^{25} per block: after four blocks z ≈ 1e43, beyond f32's 3.4e38.
    let (alpha, mu) = (-25.0, 0.1);
    let (ck, path) = constant_head(alpha, mu, dir.path());
    let px = digitish(5);
    let img = dir.path().join("far.png");
    save_gray(&px, &img);
    let model = ck.model(&Device::Cpu, DType::F32).unwrap();
    let flipped: Vec<bool> = model.blocks().iter().map(|b| b.is_flipped()).collect();
    let want = brute_force_nll(&px, alpha, mu, &flipped);
    assert!(want.is_finite() && want > 1e80, "{want}");
    // The f32 forward pass itself is not finite: the case the issue is about.
    let x = (Tensor::from_vec(
        px.iter().map(|&k| k as f32).collect::<Vec<_>>(),
        (1, 1, 8, 8),
        &Device::Cpu,
    )
    .unwrap()
        / 127.5)
        .unwrap()
        - 1.0;
    let raw = model
        .nll(
            &model.forward(&x.unwrap(), tarflow::Cond::Null).unwrap(),
            true,
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(
        !raw.is_finite(),
        "f32 NLL {raw}: the fixture no longer overflows"
    );
    for composed in [false, true] {
        let r = &score_json(&path, &img, composed)[0];
        let nll = r["nll_nats"].as_f64().unwrap_or_else(|| panic!("{r}"));
        assert!(
            ((nll - want) / want).abs() < 1e-6,
            "composed {composed}: {nll} vs brute force {want}"
        );
        assert_eq!(r["precision"], "f64");
    }
    // The library says the same, and marks the image widened.
    let opts = ScoreOptions {
        dequant: Dequant::None,
        ..Default::default()
    };
    let s = score_images(&model, &[], &[px], &opts).unwrap();
    assert!(s[0].widened && s[0].overflow.is_none());
    assert!(((s[0].nll_nats - want) / want).abs() < 1e-6);
}

#[test]
fn an_image_beyond_f64_is_reported_as_overflow_with_its_block() {
    let dir = tempfile::tempdir().unwrap();
    // e^{400} per block: the second block's output passes f64's 1.8e308.
    let (_, ck) = constant_head(-400.0, 0.1, dir.path());
    let img = dir.path().join("far.png");
    save_gray(&digitish(1), &img);
    let rows = score_json(&ck, &img, false);
    assert_eq!(rows[0]["overflow"], true, "{}", rows[0]);
    assert_eq!(rows[0]["overflow_block"], 1, "{}", rows[0]);
    assert!(rows[0].get("bits_per_dim").is_none());
    // Text output and the summary say so instead of printing inf.
    let ok = dir.path().join("ok");
    std::fs::create_dir(&ok).unwrap();
    save_gray(&digitish(1), &ok.join("a.png"));
    save_gray(&digitish(2), &ok.join("b.png"));
    let o = tarflow(&[
        "score",
        "--checkpoint",
        ck.to_str().unwrap(),
        ok.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("inf") && !out.contains("NaN"), "{out}");
    assert!(out.contains("overflow"), "{out}");
    assert!(out.contains("2 image(s) excluded"), "{out}");
}

#[test]
fn iw_bound_is_below_the_elbo_average_and_equal_at_one_draw() {
    let dir = tempfile::tempdir().unwrap();
    let ck = common::random_checkpoint(&config(), 4);
    let model = ck.model(&Device::Cpu, DType::F32).unwrap();
    let px: Vec<Vec<u8>> = (0..6).map(digitish).collect();
    let run = |k: usize, bound| {
        let opts = ScoreOptions {
            dequant: Dequant::Uniform(k),
            bound,
            seed: 7,
            ..Default::default()
        };
        score_images(&model, &[], &px, &opts).unwrap()
    };
    use tarflow::sample::score::Bound::{Elbo, Iw};
    for (e, i) in run(1, Elbo).iter().zip(run(1, Iw)) {
        assert_abs_diff_eq!(e.nll_nats, i.nll_nats, epsilon = 1e-9 * e.nll_nats.abs());
    }
    for (e, i) in run(16, Elbo).iter().zip(run(16, Iw)) {
        assert_eq!(
            e.draw_nll_nats, i.draw_nll_nats,
            "same noise for both bounds"
        );
        assert!(
            i.nll_nats <= e.nll_nats + 1e-9,
            "{} > {}",
            i.nll_nats,
            e.nll_nats
        );
        // Never below the best single draw minus ln K.
        let best = i
            .draw_nll_nats
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        assert!(i.nll_nats >= best - (16f64).ln() - 1e-9);
    }
    // The CLI takes --bound and --draws.
    let img = dir.path().join("a.png");
    save_gray(&px[0], &img);
    let p = dir.path().join("r.safetensors");
    ck.save(&p).unwrap();
    let nll = |bound: &str| -> f64 {
        let o = tarflow(&[
            "score",
            "--checkpoint",
            p.to_str().unwrap(),
            "--draws",
            "8",
            "--bound",
            bound,
            "--json",
            img.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        v["nll_nats"].as_f64().unwrap()
    };
    assert!(nll("iw") < nll("elbo"));
}

#[test]
fn the_class_mixture_lies_within_ln_c_of_the_best_class() {
    use tarflow::sample::classes::score_marginal;
    use tarflow::sample::score::Bound;
    let mut cfg = config();
    cfg.num_classes = 3;
    let model = common::random_checkpoint(&cfg, 9)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let px: Vec<Vec<u8>> = (0..4).map(digitish).collect();
    let opts = ScoreOptions {
        dequant: Dequant::Uniform(2),
        bound: Bound::Iw,
        seed: 3,
        ..Default::default()
    };
    let mix = score_marginal(&model, &[], &px, &opts).unwrap();
    let per: Vec<Vec<tarflow::sample::score::ImageScore>> = (0..3)
        .map(|k| {
            let o = ScoreOptions {
                label: Some(k),
                ..opts
            };
            score_images(&model, &[], &px, &o).unwrap()
        })
        .collect();
    for (i, m) in mix.iter().enumerate() {
        // Per draw: −log (1/3) Σ_k e^{−nll_k}, by hand.
        for d in 0..2 {
            let s: f64 = per.iter().map(|c| (-c[i].draw_nll_nats[d]).exp()).sum();
            let want = -(s / 3.0).ln();
            assert_abs_diff_eq!(m.draw_nll_nats[d], want, epsilon = 1e-6 * want.abs());
        }
        let best = per
            .iter()
            .map(|c| c[i].nll_nats)
            .fold(f64::INFINITY, f64::min);
        assert!(
            m.nll_nats <= best + 3f64.ln() + 1e-9,
            "{} vs {best}",
            m.nll_nats
        );
    }
}

#[test]
fn validation_scores_an_image_f32_cannot_as_scoring_does() {
    use std::sync::Arc;
    use tarflow::datasets::loader::Loader;
    use tarflow::datasets::transform::Transform;
    use tarflow::datasets::ImageSet;
    let dir = tempfile::tempdir().unwrap();
    let (ck, _) = constant_head(-25.0, 0.1, dir.path());
    let model = ck.model(&Device::Cpu, DType::F32).unwrap();
    let (far, near) = (digitish(5), vec![128u8; 64]);
    let set = Arc::new(ImageSet {
        channels: 1,
        height: 8,
        width: 8,
        pixels: [far.clone(), near.clone()].concat(),
        labels: None,
        latents: None,
    });
    let val = Loader::new(set, None, 2, 0, Transform::default(), false);
    let (mean, left_out) = tarflow::train::evaluate::val_bpd(&model, &val, 0)
        .unwrap()
        .unwrap();
    assert_eq!(left_out, 0, "the far image is scored in f64, not left out");
    let opts = ScoreOptions {
        dequant: Dequant::None,
        ..Default::default()
    };
    let s = score_images(&model, &[], &[far, near], &opts).unwrap();
    assert!(s[0].widened);
    let want = (s[0].bits_per_dim + s[1].bits_per_dim) / 2.0;
    assert!(
        abs_diff_eq!(mean, want, epsilon = 1e-6 * want),
        "validation {mean} vs scoring {want}"
    );
}
