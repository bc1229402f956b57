//! Agreement with the golden vectors of Apple's PyTorch ml-tarflow (tests/fixtures/tarflow-small),
//! on the CPU kernels and fast path in f32 (the composed ops: `tests/composed.rs`).

mod common;

use approx::assert_abs_diff_eq;
use candle_core::Device;
use common::load;
use common::reference::{self as check, Prec};

fn cpu() -> Prec {
    Prec::f32(Device::Cpu)
}

#[test]
fn import_infers_the_reference_config() {
    let ckpt = common::reference_checkpoint();
    let c = &ckpt.config;
    assert_eq!(
        (c.in_channels, c.img_size, c.patch_size, c.channels),
        (3, 16, 4, 128)
    );
    assert_eq!(
        (c.num_blocks, c.layers_per_block, c.num_classes, c.nvp),
        (4, 2, 10, true)
    );
    let raw = load("tarflow-small/model.safetensors");
    let learned: usize = raw
        .iter()
        .filter(|(k, _)| !k.ends_with("attn_mask") && k.as_str() != "var")
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(ckpt.num_params(), learned);
}

#[test]
fn forward_matches_reference() {
    check::forward(&cpu());
    // The headline number of the fixture, exactly.
    let p = cpu();
    let m = p.model();
    let inp = load("tarflow-small/inputs.safetensors");
    let y = common::labels(&inp["labels"]);
    let out = m.forward(&inp["x"], tarflow::Cond::Labels(&y)).unwrap();
    let loss = tarflow::TarFlow::loss(&out).unwrap();
    assert_abs_diff_eq!(
        loss.to_scalar::<f32>().unwrap(),
        0.211_481_9,
        epsilon = 1e-5
    );
}

#[test]
fn dropped_and_missing_labels_use_the_mean_class_embedding() {
    check::dropped_labels(&cpu());
}

#[test]
fn bits_per_dim_matches_evaluate_bpd() {
    check::bits_per_dim(&cpu());
}

#[test]
fn reverse_matches_reference_in_every_variant() {
    check::reverse(&cpu());
}

#[test]
fn round_trip_reproduces_the_input() {
    check::round_trip(&cpu());
}

#[test]
fn denoising_gradient_and_step_match_reference() {
    check::denoise(&cpu());
}

#[test]
fn parameter_gradients_match_reference() {
    check::parameter_gradients(&cpu());
}
