//! Apple's own `transformer_flow.Model` of ml-starflow at toy size, imported through its
//! `Model(**kwargs)` and checked value by value on the composed ops and the CPU engine: z, every
//! block's output and log-dets, the loss, and the inverse plain, guided and round trip.
//! `starflow-release` has the switches of `starflow_3B_t2i_256x256.yaml` (patch 1 over a
//! 4-channel latent, 3-D RoPE with a text axis, start token, softplus head, final RMSNorm, soft
//! clip 4, a 4-token text prefix in the deep block only, L2R order); `starflow-options` the
//! Gemma-style layers (SwiGLU, RMSNorm blocks, QK-norm, post-norm, grouped-query heads, no
//! biases, Hugging Face's RoPE pairing), text in every block, R2L, patch 2 and the learnable
//! self-denoiser.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, load};
use tarflow::flows::cond::Text;
use tarflow::flows::GuidanceRule;
use tarflow::{Checkpoint, Cond, ReverseOptions, TarFlow};

/// The imported model of reference folder `dir` and its config.
fn reference(dir: &str) -> (Checkpoint, serde_json::Value) {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{dir}/config.json"))).unwrap(),
    )
    .unwrap();
    let ck = Checkpoint::import_starflow(
        fixture(&format!("{dir}/model.safetensors")),
        &cfg["model_kwargs"],
        &Device::Cpu,
    )
    .unwrap();
    (ck, cfg)
}

fn release() -> (Checkpoint, serde_json::Value) {
    reference("starflow-release")
}

/// The process-wide engine switch set for one test, held until the test ends (the tests of
/// this binary run in parallel threads and would otherwise flip it under each other).
fn engine_switch(composed: bool) -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tarflow::flows::kernels::set_enabled(!composed);
    guard
}

fn model(ck: &Checkpoint) -> TarFlow {
    model_in(ck, DType::F32)
}

fn model_in(ck: &Checkpoint, dtype: DType) -> TarFlow {
    ck.model(&Device::Cpu, dtype).unwrap()
}

/// The tolerance (absolute and relative) of a comparison in `dtype`: f32 at 1e-4; bf16 (8
/// bits of mantissa through every layer) at what it measured on these models, with a margin.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => BF16_TOL,
        _ => 1e-4,
    }
}

/// bf16 measured at most 7.5e-2 (the guided inverse), 3.3e-2 forward, 1.3e-3 on the loss.
const BF16_TOL: f64 = 0.05;

#[test]
fn release_kwargs_map_to_our_options() {
    let (ck, _) = release();
    let c = &ck.config;
    assert!(c.rope && c.sos && c.final_norm && c.cond_deep_only);
    assert_eq!((c.txt_size, c.txt_dim), (4, 16));
    assert_eq!(c.soft_clip(), 4.0);
    assert_eq!(c.permutation, tarflow::flows::config::Permutation::L2r);
    // L2R reverses blocks 0 and 2 (the deep one) of three.
    assert_eq!(
        (0..3).map(|k| c.block_flipped(k)).collect::<Vec<_>>(),
        [true, false, true]
    );
}

/// Which engine runs each block of `m`: the CPU engine covers the release's options (RoPE,
/// the text prefix), not yet the Gemma-style layers.
fn engines_as_expected(dir: &str, m: &TarFlow, composed: bool) {
    use tarflow::flows::engine::Engine;
    let want = match (composed, dir) {
        (false, "starflow-release") => Engine::Cpu,
        _ => Engine::Composed,
    };
    for (k, b) in m.blocks().iter().enumerate() {
        assert_eq!(b.engine(), want, "{dir} block {k}");
    }
}

fn forward_matches(dir: &str, composed: bool, dtype: DType) {
    let _switch = engine_switch(composed);
    let (ck, _) = reference(dir);
    let m = model_in(&ck, dtype);
    let tol = tolerance(dtype);
    engines_as_expected(dir, &m, composed);
    let inp = load(&format!("{dir}/inputs.safetensors"));
    let exp = load(&format!("{dir}/expected.safetensors"));
    let y = &inp["y"];
    let out = m
        .forward(&inp["x"], Cond::Text(Text::new(y, None)))
        .unwrap();
    let tag = format!(
        "{dir} {dtype:?} {}",
        if composed { "composed" } else { "cpu" }
    );
    assert_close(
        &format!("{tag} z"),
        &m.to_image(&out.z).unwrap(),
        &exp["z"],
        tol,
        tol,
    );
    let x0 = m.to_tokens(&inp["x"]).unwrap();
    assert_close(
        "outputs.0",
        &x0,
        &exp["outputs.0"].flatten(1, 2).unwrap(),
        0.0,
        0.0,
    );
    for (k, b) in out.blocks.iter().enumerate() {
        let want = exp[&format!("outputs.{}", k + 1)].flatten(1, 2).unwrap();
        assert_close(&format!("{tag} outputs.{}", k + 1), &b.out, &want, tol, tol);
        let ld = exp[&format!("logdets.{k}")].clone();
        assert_close(
            &format!("{tag} logdets.{k}"),
            &b.alpha.neg().unwrap(),
            &ld,
            tol,
            tol,
        );
    }
    let loss = TarFlow::loss(&out).unwrap().reshape(1).unwrap();
    assert_close(
        &format!("{tag} loss"),
        &loss,
        &exp["loss"],
        tol / 10.0,
        tol / 10.0,
    );
}

#[test]
fn release_forward_matches_upstream_on_the_composed_ops() {
    forward_matches("starflow-release", true, DType::F32);
}

#[test]
fn release_forward_matches_upstream_on_the_cpu_engine() {
    forward_matches("starflow-release", false, DType::F32);
}

#[test]
fn options_forward_matches_upstream_on_the_composed_ops() {
    forward_matches("starflow-options", true, DType::F32);
}

#[test]
fn options_forward_matches_upstream_on_the_cpu_engine() {
    forward_matches("starflow-options", false, DType::F32);
}

fn reverse_matches(dir: &str, composed: bool, dtype: DType) {
    let _switch = engine_switch(composed);
    let (ck, cfg) = reference(dir);
    let m = model_in(&ck, dtype);
    let tol = tolerance(dtype);
    engines_as_expected(dir, &m, composed);
    let inp = load(&format!("{dir}/inputs.safetensors"));
    let exp = load(&format!("{dir}/expected.safetensors"));
    let y = &inp["y"];
    let cond = Cond::Text(Text::new(y, Some(&inp["y_null"])));
    let tag = format!(
        "{dir} {dtype:?} {}",
        if composed { "composed" } else { "cpu" }
    );
    let seq = |img: &Tensor| m.to_tokens(img).unwrap();
    let plain = m
        .reverse(&seq(&inp["z_in"]), cond, &ReverseOptions::default())
        .unwrap();
    assert_close(
        &format!("{tag} reverse.plain"),
        &plain,
        &exp["reverse.plain"],
        tol,
        tol,
    );
    let round = m
        .reverse(&seq(&exp["z"]), cond, &ReverseOptions::default())
        .unwrap();
    assert_close(
        &format!("{tag} reverse.roundtrip"),
        &round,
        &exp["reverse.roundtrip"],
        tol,
        tol,
    );
    assert_close(
        &format!("{tag} round trip = x"),
        &round,
        &inp["x"],
        tol,
        tol,
    );
    let guided = ReverseOptions {
        guidance: cfg["guidance"].as_f64().unwrap(),
        rule: GuidanceRule::Gaussian,
        ..ReverseOptions::default()
    };
    let g = m.reverse(&seq(&inp["z_in"]), cond, &guided).unwrap();
    assert_close(
        &format!("{tag} reverse.guided"),
        &g,
        &exp["reverse.guided"],
        tol,
        tol,
    );
}

#[test]
fn release_reverse_matches_upstream_on_the_composed_ops() {
    reverse_matches("starflow-release", true, DType::F32);
}

#[test]
fn release_reverse_matches_upstream_on_the_cpu_engine() {
    reverse_matches("starflow-release", false, DType::F32);
}

#[test]
fn release_in_bf16_matches_upstream_within_measured_tolerances() {
    forward_matches("starflow-release", true, DType::BF16);
    reverse_matches("starflow-release", true, DType::BF16);
}

#[test]
fn options_in_bf16_match_upstream_within_measured_tolerances() {
    forward_matches("starflow-options", true, DType::BF16);
    reverse_matches("starflow-options", true, DType::BF16);
}

#[test]
fn options_reverse_matches_upstream_on_the_composed_ops() {
    reverse_matches("starflow-options", true, DType::F32);
}

#[test]
fn options_reverse_matches_upstream_on_the_cpu_engine() {
    reverse_matches("starflow-options", false, DType::F32);
}

#[test]
fn options_self_denoiser_matches_upstream() {
    let (ck, _) = reference("starflow-options");
    assert_eq!(ck.config.denoiser_layers, 8);
    let m = model(&ck);
    let inp = load("starflow-options/inputs.safetensors");
    let exp = load("starflow-options/expected.safetensors");
    let d = m.denoiser_output(&inp["x"]).unwrap();
    assert_close("options denoiser", &d, &exp["denoiser"], 1e-4, 1e-4);
    // One learned step at the training noise: x − 0.3·pred.
    let step = m.learned_denoise(&inp["x"], 0.3, 0.0).unwrap();
    let want = (&inp["x"] - (&exp["denoiser"] * 0.3).unwrap()).unwrap();
    assert_close("options learned step", &step, &want, 1e-4, 1e-4);
}

#[test]
fn text_of_the_wrong_shape_is_an_error_naming_it() {
    let (ck, _) = release();
    let m = model(&ck);
    let inp = load("starflow-release/inputs.safetensors");
    let bad = Tensor::zeros((3, 5, 16), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .forward(&inp["x"], Cond::Text(Text::new(&bad, None)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("text embeddings `y` of shape [3, 5, 16], expected (3, 4, 16)"),
        "{e}"
    );
    let e = m.forward(&inp["x"], Cond::Null).unwrap_err().to_string();
    assert!(e.contains("--text"), "{e}");
}

/// The gradient of upstream's loss for every parameter, through our training model (on the CPU
/// each plain transformer layer is one packed variable, cut back per parameter here).
fn gradients_match(dir: &str, composed: bool) {
    let _switch = engine_switch(composed);
    let (mut ck, _) = reference(dir);
    // The self-denoiser has its own objective: the flow's loss does not reach it.
    ck.config.denoiser_layers = 0;
    ck.tensors
        .retain(|k, _| !k.starts_with("learnable_self_denoiser."));
    let (m, vars) = ck.trainable_model(&Device::Cpu, DType::F32).unwrap();
    let inp = load(&format!("{dir}/inputs.safetensors"));
    let want = load(&format!("{dir}/grads.safetensors"));
    let out = m
        .forward(&inp["x"], Cond::Text(Text::new(&inp["y"], None)))
        .unwrap();
    let loss = TarFlow::loss(&out).unwrap();
    let grads = common::param_grads(&ck.config, &vars, &loss.backward().unwrap());
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let ours: Vec<&String> = {
        let mut v: Vec<&String> = grads.keys().collect();
        v.sort();
        v
    };
    assert_eq!(ours, names, "{dir}: one gradient per upstream parameter");
    for name in names {
        let r = &want[name];
        let scale = r
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert_close(
            &format!("{dir} grad {name}"),
            &grads[name],
            r,
            1e-4 * scale + 1e-9,
            1e-3,
        );
    }
}

#[test]
fn release_parameter_gradients_match_upstream() {
    gradients_match("starflow-release", false);
}

#[test]
fn options_parameter_gradients_match_upstream() {
    gradients_match("starflow-options", true);
}

/// The parallel (Jacobi) inverse reads the text prefix as the sequential one does, plain and
/// guided: both reach upstream's samples.
#[test]
fn jacobi_inverse_with_text_reaches_upstream() {
    let _switch = engine_switch(true);
    let (ck, cfg) = release();
    let m = model(&ck);
    let inp = load("starflow-release/inputs.safetensors");
    let exp = load("starflow-release/expected.safetensors");
    let cond = Cond::Text(Text::new(&inp["y"], Some(&inp["y_null"])));
    let z = m.to_tokens(&inp["z_in"]).unwrap();
    let j = tarflow::flows::JacobiOptions {
        tol: 1e-12,
        max_iters: 200,
        ..Default::default()
    };
    let (plain, _) = m
        .reverse_jacobi(&z, cond, &ReverseOptions::default(), &j)
        .unwrap();
    assert_close(
        "jacobi reverse.plain",
        &plain,
        &exp["reverse.plain"],
        1e-4,
        1e-4,
    );
    let guided = ReverseOptions {
        guidance: cfg["guidance"].as_f64().unwrap(),
        rule: GuidanceRule::Gaussian,
        ..ReverseOptions::default()
    };
    let (g, _) = m.reverse_jacobi(&z, cond, &guided, &j).unwrap();
    assert_close(
        "jacobi reverse.guided",
        &g,
        &exp["reverse.guided"],
        1e-4,
        1e-4,
    );
}
