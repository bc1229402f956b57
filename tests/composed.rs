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

/// The test device's name, as the CLI takes it.
fn device_name() -> String {
    std::env::var("TARFLOW_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// The reference checkpoint written with every tensor in `dtype` (f64, f16, bf16 files exist:
/// checkpoints accept them), keeping its tarflow metadata.
fn checkpoint_in(dtype: DType, path: &std::path::Path) {
    let f32_file = path.with_extension("f32.safetensors");
    common::reference_checkpoint().save(&f32_file).unwrap();
    let bytes = std::fs::read(&f32_file).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let cast: Vec<(String, candle_core::Tensor)> = map
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    let out = safetensors::tensor::serialize(
        cast.iter().map(|(k, v)| (k.as_str(), v)),
        meta.metadata().clone(),
    )
    .unwrap();
    std::fs::write(path, out).unwrap();
}

/// The loading paths put nothing f64 on a GPU: a checkpoint holding f64, f16 or bf16 tensors
/// loads onto the test device (in f32 there: cast on the host first) and scores the reference
/// images as the f32 file does (f64 exactly, the 16-bit files within their rounding).
#[test]
fn checkpoints_in_f64_f16_and_bf16_load_and_score_like_f32() {
    let dev = device();
    let dir = tempfile::tempdir().unwrap();
    let inp = load("tarflow-small/inputs.safetensors");
    let bpd = |ck: &tarflow::Checkpoint| -> Vec<f64> {
        let m = ck.model(&dev, DType::F32).unwrap();
        let x = tarflow::flows::device::upload(&inp["x"], &dev, DType::F32).unwrap();
        let out = m.forward(&x, Cond::Null).unwrap();
        let b = m
            .bits_per_dim(&out, tarflow::flows::BpdConvention::TrueDims)
            .unwrap();
        tarflow::flows::device::host_f64(&b)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let want = bpd(&common::reference_checkpoint());
    for (dtype, tol) in [(DType::F64, 1e-6), (DType::F16, 2e-2), (DType::BF16, 5e-2)] {
        let p = dir.path().join(format!("{dtype:?}.safetensors"));
        checkpoint_in(dtype, &p);
        let ck = tarflow::Checkpoint::load(&p, &dev).unwrap();
        for (k, t) in &ck.tensors {
            assert!(
                t.device().same_device(&dev),
                "{dtype:?}: {k} not on the device"
            );
            if !dev.is_cpu() {
                assert_eq!(
                    t.dtype(),
                    DType::F32,
                    "{dtype:?}: {k} reached the GPU uncast"
                );
            }
        }
        let got = bpd(&ck);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= tol * w.abs(),
                "{dtype:?} file: {g} bits/dim, the f32 file {w}"
            );
        }
    }
}

/// `sample --noise` with an f64 file replays exactly what its f32 twin does (the file is read
/// and cast on the host, then uploaded in the model's dtype).
#[test]
fn an_f64_noise_file_samples_as_its_f32_twin() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ref.safetensors");
    let c = common::reference_checkpoint();
    c.save(&ck).unwrap();
    let (t, d) = (c.config.num_tokens(), c.config.patch_dim());
    let mut rng = tarflow::flows::rng::seeded(7);
    let z = tarflow::flows::rng::randn(&mut rng, (2, t, d), 1.0, &Device::Cpu).unwrap();
    let dev = device_name();
    let sample = |dtype: DType| -> Vec<f32> {
        let noise = dir.path().join(format!("z-{dtype:?}.safetensors"));
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("z".to_string(), z.to_dtype(dtype).unwrap())]),
            &noise,
        )
        .unwrap();
        let out = dir.path().join(format!("x-{dtype:?}.safetensors"));
        let o = tarflow(&[
            "--composed",
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--noise",
            noise.to_str().unwrap(),
            "--labels",
            "1,2",
            "--out",
            dir.path().join("grid.png").to_str().unwrap(),
            "--out-tensor",
            out.to_str().unwrap(),
            "--device",
            &dev,
        ]);
        assert!(o.status.success(), "{dtype:?}: {}", text(&o));
        load_abs(&out)["samples"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (sample(DType::F32), sample(DType::F64));
    assert_eq!(a.len(), 2 * 3 * 16 * 16);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(
        a, b,
        "the f64 noise file sampled differently from its f32 twin"
    );
}

fn load_abs(p: &std::path::Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// Every command opens its device once and passes it down (on Metal a second opening is a
/// second device id, whose tensors the first one's ops refuse): train, resume, sample, score,
/// and bench each select once, quantize (CPU only) never.
#[test]
fn every_command_selects_its_device_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let run = dir.path().join("tiny");
    let dev = device_name();
    let out = format!("output.dir={}", dir.path().display());
    let png = dir.path().join("x.png");
    let grid = png.to_str().unwrap();
    let digit = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/mnist-samples/test-0000-label-7.png"
    );
    let (cfg_s, run_s) = (cfg.to_str().unwrap(), run.to_str().unwrap());
    let gguf = dir.path().join("q.gguf");
    let commands: Vec<(&str, Vec<&str>, usize)> = vec![
        (
            "train",
            vec![
                "train",
                "--config",
                cfg_s,
                "--device",
                &dev,
                "--set",
                &out,
                "--set",
                "train.max_steps=4",
                "--set",
                "train.checkpoint_every=2",
                "--set",
                "optim.ema_decay=0.9",
                "--set",
                "eval.every=0",
                "--set",
                "eval.sample_every=0",
            ],
            1,
        ),
        (
            "resume",
            vec!["train", "--resume", run_s, "--set", "train.max_steps=6"],
            1,
        ),
        (
            "sample",
            vec![
                "sample",
                "--checkpoint",
                run_s,
                "--num",
                "2",
                "--out",
                grid,
                "--device",
                &dev,
            ],
            1,
        ),
        (
            "score",
            vec!["score", digit, "--checkpoint", run_s, "--device", &dev],
            1,
        ),
        (
            "bench",
            vec![
                "bench", "score", "--config", "tiny", "--iters", "1", "--device", &dev,
            ],
            1,
        ),
        (
            "quantize",
            vec![
                "quantize",
                run_s,
                "--to",
                "q8_0",
                "-o",
                gguf.to_str().unwrap(),
            ],
            0,
        ),
    ];
    for (name, args, want) in commands {
        let o = common::tarflow_with(&args, &[("TARFLOW_TRACE_DEVICE", "1")]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        let n = err
            .lines()
            .filter(|l| l.starts_with("device selection #"))
            .count();
        assert_eq!(n, want, "{name} selected its device {n} times:\n{err}");
    }
}

/// The average starts from the weights as they were, not from the buffer the optimizer
/// overwrites: after one AdamW step it is d·w₀ + (1 − d)·w₁ exactly. On Metal, where
/// `Tensor::copy` shares the buffer, a shared start would give w₁ here. Runs on
/// `TARFLOW_TEST_DEVICE` (scripts/metal-check.sh sets it), in f32 and bf16.
#[test]
fn the_starting_values_survive_the_first_optimizer_step() {
    let (name, dev) = (device_name(), device());
    for dtype in [DType::F32, DType::BF16] {
        let w0 = [0.5f32, -1.0, 2.0, 0.25];
        let host = candle_core::Tensor::new(&w0, &Device::Cpu).unwrap();
        let v =
            Var::from_tensor(&tarflow::flows::device::upload(&host, &dev, dtype).unwrap()).unwrap();
        let vars = vec![("w".to_string(), v.clone())];
        let mut ema = tarflow::train::ema::Ema::new(&vars, 0.9).unwrap();
        let mut opt = tarflow::train::optim::AdamW::new(vars.clone(), Default::default()).unwrap();
        let loss = v
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step_scaled(&loss.backward().unwrap(), 0.1, 1.0)
            .unwrap();
        let read = |t: &candle_core::Tensor| {
            tarflow::flows::device::host_f64(t)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let w1 = read(v.as_tensor());
        assert!(
            w1.iter()
                .zip(&w0)
                .all(|(a, b)| (a - *b as f64).abs() > 0.05),
            "{dtype:?}: the step moved every weight ({w1:?})"
        );
        ema.update_with(&vars, 0.5).unwrap();
        let got = read(&ema.weights()["w"]);
        for i in 0..4 {
            let want = 0.5 * w0[i] as f64 + 0.5 * w1[i];
            assert!(
                (got[i] - want).abs() < 1e-6,
                "{dtype:?} on {name}: EMA[{i}] = {}, expected ½·w₀ + ½·w₁ = {want} (w₁ = {})",
                got[i],
                w1[i]
            );
        }
    }
}
