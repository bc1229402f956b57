//! The GPU path, tested on any machine: candle's composed ops (what CUDA and Metal run) with the
//! CPU kernels switched off, against the PyTorch reference vectors in f32 and bf16; no f64
//! tensor anywhere on that path (Metal has none); bf16 training lowers the loss; `score --dtype
//! bf16` matches f32.
//!
//! The device is the CPU unless `TARFLOW_TEST_DEVICE` names another (`cuda`, `metal`): the GPU
//! check (`scripts/gpu-check.sh`) runs this binary on an H200 that way.

mod common;

use candle_core::{DType, Device, Var};
use common::reference::{self as check, Prec};
use common::{labels, load, tarflow, text, TINY};
use tarflow::flows::kernels;
use tarflow::{Cond, ReverseOptions, TarFlow};

/// The test device, with the CPU kernels off (every test of this binary wants them off, so the
/// process-wide switch is never turned back on here).
fn device() -> Device {
    kernels::set_enabled(false);
    let name = std::env::var("TARFLOW_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    tarflow::flows::device::select(&name).unwrap()
}

fn f32() -> Prec {
    Prec::f32(device())
}

fn bf16() -> Prec {
    Prec::bf16(device())
}

#[test]
fn f32_forward_matches_reference() {
    check::forward(&f32());
    check::dropped_labels(&f32());
}

#[test]
fn f32_bits_per_dim_match_reference() {
    check::bits_per_dim(&f32());
}

#[test]
fn f32_reverse_matches_reference_in_every_variant() {
    check::reverse(&f32());
    check::round_trip(&f32());
}

#[test]
fn f32_denoising_matches_reference() {
    check::denoise(&f32());
}

#[test]
fn f32_parameter_gradients_match_reference() {
    check::parameter_gradients(&f32());
}

#[test]
fn bf16_forward_matches_reference() {
    check::forward(&bf16());
    check::dropped_labels(&bf16());
}

#[test]
fn bf16_bits_per_dim_match_reference() {
    check::bits_per_dim(&bf16());
}

#[test]
fn bf16_reverse_matches_reference_in_every_variant() {
    check::reverse(&bf16());
    check::round_trip(&bf16());
}

#[test]
fn bf16_denoising_matches_reference() {
    check::denoise(&bf16());
}

#[test]
fn bf16_parameter_gradients_match_reference() {
    check::parameter_gradients(&bf16());
}

/// Every tensor the training graph, the inverse and the denoising gradient depend on, in bf16
/// and f32: none is f64, and in bf16 the f32 islands (LayerNorm statistics, exp of the
/// log-scales, log-dets, loss) are f32.
#[test]
fn the_gpu_path_creates_no_f64_tensor() {
    let dev = device();
    let inp = load("tarflow-small/inputs.safetensors");
    let y = labels(&inp["labels"]);
    for dtype in [DType::F32, DType::BF16] {
        let (m, _vars) = common::reference_checkpoint()
            .trainable_model(&dev, dtype)
            .unwrap();
        // Training: the graph from the loss back to every weight and to the input.
        let x = Var::from_tensor(&tarflow::flows::device::upload(&inp["x"], &dev, dtype).unwrap())
            .unwrap();
        let out = m.forward(x.as_tensor(), Cond::Labels(&y)).unwrap();
        let loss = TarFlow::loss(&out).unwrap();
        assert_eq!(loss.dtype(), DType::F32, "{dtype:?}: loss");
        assert_eq!(out.logdets.dtype(), DType::F32, "{dtype:?}: log-dets");
        for b in &out.blocks {
            assert_eq!(b.logdet.dtype(), DType::F32, "{dtype:?}: block log-det");
        }
        assert_eq!(out.z.dtype(), dtype);
        let nodes = loss.sorted_nodes();
        assert!(nodes.len() > 100, "the graph was walked ({})", nodes.len());
        let f64s = nodes.iter().filter(|t| t.dtype() == DType::F64).count();
        assert_eq!(
            f64s, 0,
            "{dtype:?}: {f64s} f64 tensors in the training graph"
        );
        if dtype == DType::BF16 {
            let f32s = nodes.iter().filter(|t| t.dtype() == DType::F32).count();
            assert!(f32s > 20, "bf16: the f32 islands exist ({f32s} f32 nodes)");
        }
        // The inverse, guided (both passes), with a tracked latent so its graph can be walked.
        let z = Var::from_tensor(
            &tarflow::flows::device::upload(&inp["z_sample"], &dev, dtype).unwrap(),
        )
        .unwrap();
        let o = ReverseOptions {
            guidance: 2.0,
            annealed: true,
            ..Default::default()
        };
        let x = m.reverse(z.as_tensor(), Cond::Labels(&y), &o).unwrap();
        let nodes = x.sorted_nodes();
        assert!(nodes.len() > 100, "reverse graph ({})", nodes.len());
        assert!(
            nodes.iter().all(|t| t.dtype() != DType::F64),
            "{dtype:?}: reverse"
        );
        // Denoising and NLL/bits-per-dim read-outs.
        let m = common::reference_checkpoint().model(&dev, dtype).unwrap();
        let d = m
            .denoise(
                &tarflow::flows::device::upload(&inp["denoise_x"], &dev, DType::F32).unwrap(),
                Cond::Labels(&y),
                0.05,
                1.0,
            )
            .unwrap();
        assert_ne!(d.dtype(), DType::F64);
        let out = m
            .forward(
                &tarflow::flows::device::upload(&inp["x"], &dev, DType::F32).unwrap(),
                Cond::Null,
            )
            .unwrap();
        assert_eq!(m.nll(&out, true).unwrap().dtype(), DType::F32);
        assert_eq!(m.nll_per_token(&out, true).unwrap().dtype(), DType::F32);
    }
}

/// Metric records of a CLI training run with the composed ops in bf16.
#[test]
fn fifty_bf16_steps_on_the_composed_path_lower_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let out = format!("output.dir={}", dir.path().display());
    let dev = std::env::var("TARFLOW_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let o = tarflow(&[
        "--composed",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--device",
        &dev,
        "--set",
        &out,
        "--set",
        "train.dtype=bf16",
        "--set",
        "train.max_steps=50",
        "--set",
        "eval.every=50",
        "--set",
        "eval.sample_every=50",
        "--set",
        "train.checkpoint_every=50",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let recs = tarflow::train::metrics::read(&dir.path().join("tiny/metrics.jsonl")).unwrap();
    let l: Vec<f64> = recs.iter().filter_map(|r| r.loss).collect();
    assert_eq!(l.len(), 50);
    let first = l[..5].iter().sum::<f64>() / 5.0;
    let last = l[45..].iter().sum::<f64>() / 5.0;
    assert!(
        l.iter().all(|v| v.is_finite()) && last < first - 0.2,
        "bf16 loss {first:.4} → {last:.4}"
    );
    let val: Vec<f64> = recs.iter().filter_map(|r| r.val_bpd).collect();
    assert!(
        val.len() == 1 && val[0].is_finite() && val[0] < 9.0,
        "{val:?}"
    );
}

/// `tarflow score --dtype bf16 --composed` gives the f32 bits/dim within 5e-3 relative.
#[test]
fn score_in_bf16_matches_f32() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ref.safetensors");
    common::reference_checkpoint().save(&ck).unwrap();
    // Eight 16×16 RGB test images: the reference inputs, written as PNGs.
    let inp = load("tarflow-small/inputs.safetensors");
    let x = ((inp["x"].clone() + 1.0).unwrap() * 127.5)
        .unwrap()
        .clamp(0.0, 255.0)
        .unwrap();
    let n = x.dim(0).unwrap();
    for i in 0..n {
        let v: Vec<u8> = x
            .get(i)
            .unwrap()
            .permute((1, 2, 0))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|p| p.round() as u8)
            .collect();
        image::RgbImage::from_raw(16, 16, v)
            .unwrap()
            .save(dir.path().join(format!("img{i}.png")))
            .unwrap();
    }
    let dev = std::env::var("TARFLOW_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let score = |dtype: &str| -> Vec<f64> {
        let o = tarflow(&[
            "--composed",
            "score",
            dir.path().to_str().unwrap(),
            "--checkpoint",
            ck.to_str().unwrap(),
            "--dequant",
            "none",
            "--json",
            "--dtype",
            dtype,
            "--device",
            &dev,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["bits_per_dim"].as_f64().unwrap()
            })
            .collect()
    };
    let (a, b) = (score("f32"), score("bf16"));
    assert_eq!(a.len(), n);
    for (x, y) in a.iter().zip(&b) {
        let rel = (x - y).abs() / x.abs();
        assert!(rel < 5e-3, "bf16 {y} vs f32 {x}: {rel:.2e} relative");
    }
}
