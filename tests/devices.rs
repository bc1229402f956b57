//! The device rules that only Apple's GPUs enforce, held on whatever `TARFLOW_TEST_DEVICE` names
//! (the CPU by default; `scripts/metal-check.sh` runs this binary on Metal): nothing f64 reaches
//! a GPU through the loading paths (checkpoints in f64/f16/bf16, an f64 noise file), every
//! command selects its device once, and the EMA keeps its starting values past the first
//! optimizer step (on Metal `Tensor::copy` shares the buffer).

mod common;

use approx::abs_diff_eq;
use candle_core::{DType, Device, Var};
use common::{load, tarflow, text, TINY};
use tarflow::flows::kernels;
use tarflow::Cond;

/// The test device, with the CPU kernels off (the composed ops are the path GPUs run).
fn device() -> Device {
    kernels::set_enabled(false);
    tarflow::flows::device::select(&device_name()).unwrap()
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
                abs_diff_eq!(g, w, epsilon = tol * w.abs()),
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
                abs_diff_eq!(got[i], want, epsilon = 1e-6),
                "{dtype:?} on {name}: EMA[{i}] = {}, expected ½·w₀ + ½·w₁ = {want} (w₁ = {})",
                got[i],
                w1[i]
            );
        }
    }
}
