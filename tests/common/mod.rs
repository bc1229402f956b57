//! Shared helpers of the integration tests: fixture paths, tensor comparisons, running the binary.
#![allow(dead_code)]

use approx::AbsDiffEq;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub mod reference;

/// Path of a file under `tests/fixtures/` (or under `$TARFLOW_FIXTURES`, for a test binary
/// copied to another machine, as the GPU check does).
pub fn fixture(rel: &str) -> PathBuf {
    match std::env::var_os("TARFLOW_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(rel),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel),
    }
}

/// All tensors of a fixture safetensors file, on the CPU.
pub fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture readable")
}

/// The elements of `t` on the host in f64 (copied first: Metal has no f64).
fn host(t: &Tensor) -> Vec<f64> {
    tarflow::flows::device::host_f64(t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// A tensor's values on the host in f64, compared element-wise through `approx`
/// (`assert_abs_diff_eq!`, `assert_abs_diff_ne!`) or exactly (`assert_eq!`).
#[derive(Clone, PartialEq)]
pub struct Values {
    name: String,
    shape: Vec<usize>,
    v: Vec<f64>,
}

/// `t`'s values, for comparing with approx's assertions.
pub fn values(t: &Tensor) -> Values {
    Values {
        name: String::new(),
        shape: t.dims().to_vec(),
        v: host(t),
    }
}

impl Values {
    /// The same values, named in a failing assertion's message.
    pub fn named(mut self, name: impl std::fmt::Display) -> Self {
        self.name = name.to_string();
        self
    }
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let max = self.v.iter().fold(0f64, |m, x| m.max(x.abs()));
        let head: Vec<String> = self.v.iter().take(4).map(|x| format!("{x:.6e}")).collect();
        write!(
            f,
            "{} {:?} [{}, …] max |v| {max:.3e}",
            self.name,
            self.shape,
            head.join(", ")
        )
    }
}

impl AbsDiffEq for Values {
    type Epsilon = f64;

    fn default_epsilon() -> f64 {
        f64::default_epsilon()
    }

    /// Same shape, and every element within `epsilon` of the other's.
    fn abs_diff_eq(&self, other: &Self, epsilon: f64) -> bool {
        self.shape == other.shape
            && self
                .v
                .iter()
                .zip(&other.v)
                .all(|(a, b)| a.abs_diff_eq(b, epsilon))
    }
}

/// Asserts `|a − b| ≤ atol + rtol·|b|` element-wise (numpy's `allclose`, each element through
/// `approx::abs_diff_eq!`), naming the worst element; with `TARFLOW_TEST_REPORT` set, also
/// prints each comparison's max abs diff (to measure tolerances).
pub fn assert_close(name: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(a.dims(), b.dims(), "{name}: shape mismatch");
    let (av, bv) = (host(a), host(b));
    let (mut worst, mut max_abs) = ((f64::MIN, 0usize), 0f64);
    for (i, (x, y)) in av.iter().zip(&bv).enumerate() {
        assert!(x.is_finite(), "{name}: element {i} is {x}");
        let tol = atol + rtol * y.abs();
        max_abs = max_abs.max((x - y).abs());
        if !approx::abs_diff_eq!(x, y, epsilon = tol) && (x - y).abs() - tol > worst.0 {
            worst = ((x - y).abs() - tol, i);
        }
    }
    if std::env::var_os("TARFLOW_TEST_REPORT").is_some() {
        eprintln!("{name}: max abs diff {max_abs:.3e} (tolerance {atol:.1e} + {rtol:.1e}·|ref|)");
    }
    assert!(
        worst.0 == f64::MIN,
        "{name}: element {} is {} but expected {} (atol {atol}, rtol {rtol}; max abs diff {max_abs})",
        worst.1,
        av[worst.1],
        bv[worst.1],
    );
}

/// Labels tensor (int64) as a Vec.
pub fn labels(t: &Tensor) -> Vec<i64> {
    t.to_vec1::<i64>().unwrap()
}

/// A randomly initialised model whose `proj_out` weights are non-zero (the upstream init zeroes
/// them, which would make every block input-independent), with perturbed norms and embeddings.
pub fn random_checkpoint(cfg: &tarflow::ModelConfig, seed: u64) -> tarflow::Checkpoint {
    use tarflow::flows::rng::{randn, seeded};
    let mut ckpt = tarflow::Checkpoint::init(cfg, seed, &Device::Cpu).unwrap();
    let mut rng = seeded(seed + 1000);
    let mut names: Vec<String> = ckpt.tensors.keys().cloned().collect();
    names.sort();
    for name in names {
        let t = ckpt.tensors[&name].clone();
        let std = if name.ends_with("proj_out.weight") {
            0.02
        } else if name.contains("norm") || name.ends_with("embed") {
            0.1
        } else {
            continue;
        };
        let noise = randn(&mut rng, t.dims().to_vec(), std, &Device::Cpu).unwrap();
        ckpt.tensors.insert(name, (t + noise).unwrap());
    }
    ckpt
}

/// The gradient of every model parameter by name, from a trainable model's variables (on the
/// CPU each transformer layer is one packed variable: its gradient is cut back per parameter).
pub fn param_grads(
    cfg: &tarflow::ModelConfig,
    vars: &candle_nn::VarMap,
    grads: &impl tarflow::train::grads::GradSource,
) -> HashMap<String, Tensor> {
    let data = vars.data().lock().unwrap();
    let by_var: HashMap<String, Tensor> = data
        .iter()
        .map(|(name, var)| {
            let g = grads
                .grad(name, var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            (name.clone(), g.clone())
        })
        .collect();
    let packing =
        tarflow::flows::packing::Packing::among(cfg, data.keys().map(|k| k.as_str())).unwrap();
    packing.unpack(by_var, "").unwrap()
}

/// Random images in [-1, 1] of shape (n, c, s, s).
pub fn random_images(n: usize, c: usize, s: usize, seed: u64) -> Tensor {
    let mut rng = tarflow::flows::rng::seeded(seed);
    tarflow::flows::rng::uniform(&mut rng, (n, c, s, s), -1.0, 1.0, &Device::Cpu).unwrap()
}

/// The ml-tarflow reference checkpoint of the golden vectors, imported from its raw state_dict.
pub fn reference_checkpoint() -> tarflow::Checkpoint {
    tarflow::Checkpoint::import(
        fixture("tarflow-small/model.safetensors"),
        16,
        4,
        None,
        &Device::Cpu,
    )
    .unwrap()
}

/// Runs the `tarflow` binary with one rayon thread (tests run in parallel); `TARFLOW_BIN` names
/// another copy (a test binary moved to another machine, as the GPU check does).
pub fn tarflow(args: &[&str]) -> std::process::Output {
    tarflow_with(args, &[])
}

/// [`tarflow`] with extra environment variables.
pub fn tarflow_with(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let bin = std::env::var_os("TARFLOW_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tarflow")));
    std::process::Command::new(bin)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `tarflow import` of the `starflow-release` fixture by its `Model(**kwargs)` into `out`;
/// returns what the command printed.
pub fn import_starflow_release(out: &std::path::Path) -> String {
    let f = |n: &str| fixture(&format!("starflow-release/{n}"));
    let (model, kw) = (f("model.safetensors"), f("config.json"));
    let o = tarflow(&[
        "import",
        model.to_str().unwrap(),
        "--from",
        "ml-starflow",
        "--model-kwargs",
        kw.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

/// `tarflow train --config CFG` into the folder `out`, with `sets` as `--set` overrides.
pub fn train(cfg: &std::path::Path, out: &std::path::Path, sets: &[&str]) -> std::process::Output {
    let out_set = format!("output.dir={}", out.display());
    let mut args = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &out_set,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    tarflow(&args)
}

/// Exit status, stdout and stderr of a run, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A tiny conditional model on the embedded digits: a step takes milliseconds.
pub const TINY: &str = r#"
[model]
in_channels = 1
img_size = 28
patch_size = 7
channels = 64
num_blocks = 2
layers_per_block = 1
num_classes = 10

[data]
source = "embedded"
val_count = 64
noise_std = 0.1
label_drop = 0.1

[optim]
lr = 3e-3
min_lr = 1e-5
warmup_steps = 2
ema_decay = 0.99
grad_clip = 5.0

[train]
max_steps = 24
batch_size = 16
log_every = 1
checkpoint_every = 8

[eval]
every = 12
batches = 2
sample_every = 12
num_samples = 4
"#;

/// The model, EMA and optimizer files of checkpoint folder `rel` are bit-identical in two runs.
pub fn assert_same_checkpoint(a: &std::path::Path, b: &std::path::Path, rel: &str) {
    for f in ["model", "ema", "optimizer"] {
        let p = format!("{rel}/{f}.safetensors");
        let x = candle_core::safetensors::load(a.join(&p), &Device::Cpu).unwrap();
        let y = candle_core::safetensors::load(b.join(&p), &Device::Cpu).unwrap();
        assert_eq!(x.len(), y.len());
        for (k, t) in &x {
            let u = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let v = y[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                u == v,
                "{p}: {k} differs between {} and {}",
                a.display(),
                b.display()
            );
        }
    }
}

/// PSNR in dB (values in [−1, 1] read as [0, 1]) of the autoencoder folder `dir` reconstructing
/// `set` from its posterior means, which must have the (C, h, w) `latent`.
pub fn reconstruction_psnr(
    dir: &str,
    set: &tarflow::datasets::ImageSet,
    latent: [usize; 3],
) -> f64 {
    use tarflow::flows::autoencoder::Autoencoder;
    let vae = Autoencoder::load(
        std::path::Path::new(dir),
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let v: Vec<f32> = set
        .pixels
        .iter()
        .map(|&k| tarflow::datasets::transform::to_unit(k))
        .collect();
    let shape = (set.len(), set.channels, set.height, set.width);
    let x = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let (mean, _) = vae.encode(&x).unwrap();
    assert_eq!(mean.dims()[1..], latent);
    let xr = vae.decode(&mean).unwrap().clamp(-1f32, 1f32).unwrap();
    let mse = (xr - &x)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    10.0 * (4.0 / mse).log10()
}
