//! The learnable self-denoiser trained by ml-starflow's objective: the objective fits
//! σ·numel·∂loss/∂x on noisy images, and `tarflow train` trains the denoiser without touching
//! the flow's own training (the same weights as a run without it).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{text, train};
use tarflow::flows::rng::{randn, seeded};
use tarflow::{Checkpoint, TarFlow};

const SETS: [&str; 5] = [
    "train.max_steps=30",
    "train.log_every=10",
    "train.checkpoint_every=30",
    "eval.every=0",
    "eval.sample_every=0",
];

fn run(out: &std::path::Path, extra: &[&str]) -> Checkpoint {
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.toml");
    let sets: Vec<&str> = SETS.iter().copied().chain(extra.iter().copied()).collect();
    let o = train(&cfg, out, &sets);
    assert!(o.status.success(), "{}", text(&o));
    let ck = out.join("quickstart/checkpoints/step-0000030");
    tarflow::sample::resolve::resolve(&ck, false, &Device::Cpu)
        .unwrap()
        .checkpoint
}

/// Noisy digits (the last `n` of the embedded set plus σ-noise) in the model's layout.
fn noisy_digits(m: &TarFlow, n: usize, sigma: f64) -> Tensor {
    let c = m.config();
    let set = tarflow::datasets::embedded::mnist10k().unwrap();
    let px: Vec<f32> = (set.len() - n..set.len())
        .flat_map(|i| {
            set.image(i)
                .unwrap()
                .iter()
                .map(|&k| tarflow::datasets::transform::to_unit(k))
        })
        .collect();
    let x = Tensor::from_vec(px, (n, c.in_channels, c.img_size, c.img_size), &Device::Cpu).unwrap();
    let noise = randn(&mut seeded(8), x.dims().to_vec(), sigma, &Device::Cpu).unwrap();
    (x + noise).unwrap()
}

#[test]
fn training_trains_the_denoiser_and_leaves_the_flow_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let with = run(&dir.path().join("with"), &["model.denoiser_layers=1"]);
    let without = run(&dir.path().join("without"), &[]);
    // The flow's weights are those of the run without a denoiser, bit for bit.
    for (name, t) in &without.tensors {
        let w: &Tensor = &with.tensors[name];
        let d = (w - t).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            d.to_scalar::<f32>().unwrap(),
            0.0,
            "{name} differs with the denoiser"
        );
    }
    // Its error is logged beside the flow's loss.
    let run = tarflow::train::run::Run::open(dir.path().join("with/quickstart")).unwrap();
    let curve = run.curve("denoiser_loss").unwrap();
    assert_eq!(curve.len(), 3, "{curve:?}");
    assert!(
        curve.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
        "{curve:?}"
    );
    // The denoiser's head left its zero init.
    let head = &with.tensors["learnable_self_denoiser.proj_out.weight"];
    let moved = head
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 0.0, "the denoiser did not train");
}

/// The objective itself, on one batch with the flow frozen: the denoiser's error against
/// σ·numel·∂loss/∂x falls to well under half in 60 AdamW steps.
#[test]
fn the_objective_fits_the_scaled_score() {
    use tarflow::train::optim::{AdamW, AdamWConfig};
    let cfg = tarflow::flows::config::ModelConfig {
        denoiser_layers: 1,
        ..tarflow::ModelConfig::new(1, 28, 4, 64, 2, 1, 0)
    };
    let ck = common::random_checkpoint(&cfg, 3);
    let (m, varmap) = ck.trainable_model(&Device::Cpu, DType::F32).unwrap();
    let vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let den: Vec<(String, candle_core::Var)> = vars
        .iter()
        .filter(|(n, _)| n.starts_with(tarflow::train::grads::DENOISER))
        .cloned()
        .collect();
    let mut opt = AdamW::new(den, AdamWConfig::default()).unwrap();
    let sigma = 0.1;
    let x = noisy_digits(&m, 8, sigma);
    let labels = vec![-1i64; 8];
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..60 {
        let (v, g) =
            tarflow::train::grads::denoiser_grads(&m, &vars, (&x, &labels), 1, sigma, 0.0).unwrap();
        first.get_or_insert(v);
        last = v;
        opt.step(&g, 3e-3).unwrap();
    }
    let first = first.unwrap();
    assert!(last < 0.4 * first, "denoiser error {first} → {last}");
}

#[test]
fn the_denoiser_needs_gaussian_training_noise() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.toml");
    let o = train(
        &cfg,
        dir.path(),
        &["model.denoiser_layers=1", "data.noise=\"uniform\""],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("model.denoiser_layers"), "{}", text(&o));
}
