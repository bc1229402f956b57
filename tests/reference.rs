//! Agreement with the golden vectors of Apple's PyTorch ml-tarflow (tests/fixtures/tarflow-small).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, labels, load};
use tarflow::flows::model::{BpdConvention, GuideWhat};
use tarflow::{Cond, ReverseOptions, TarFlow};

fn model() -> TarFlow {
    let ckpt = common::reference_checkpoint();
    ckpt.model(&Device::Cpu, DType::F32).unwrap()
}

const FWD: f64 = 1e-4;

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
    let (m, inp, exp) = (
        model(),
        load("tarflow-small/inputs.safetensors"),
        load("tarflow-small/expected.safetensors"),
    );
    let y = labels(&inp["labels"]);
    let out = m.forward(&inp["x"], Cond::Labels(&y)).unwrap();
    assert_close("z", &out.z, &exp["z"], FWD, FWD);
    assert_close("logdets", &out.logdets, &exp["logdets"], FWD, FWD);
    for (k, b) in out.blocks.iter().enumerate() {
        assert_close(
            &format!("block_out.{k}"),
            &b.out,
            &exp[&format!("block_out.{k}")],
            FWD,
            FWD,
        );
        assert_close(
            &format!("block_logdet.{k}"),
            &b.logdet,
            &exp[&format!("block_logdet.{k}")],
            FWD,
            FWD,
        );
        assert_close(
            &format!("block_proj_out.{k}"),
            &b.proj_out,
            &exp[&format!("block_proj_out.{k}")],
            FWD,
            FWD,
        );
    }
    let loss = TarFlow::loss(&out).unwrap();
    assert_close("loss", &loss, &exp["loss"], FWD, FWD);
    assert!((loss.to_scalar::<f32>().unwrap() - 0.211_481_9).abs() < 1e-5);
    assert_close(
        "loss_per_sample",
        &TarFlow::loss_per_sample(&out).unwrap(),
        &exp["loss_per_sample"],
        FWD,
        FWD,
    );
    let mse = (out.z.sqr().unwrap().mean_all().unwrap() * 0.5).unwrap();
    assert_close("loss_mse_z", &mse, &exp["loss_mse_z"], FWD, FWD);
    assert_close(
        "loss_logdet_mean",
        &out.logdets.mean_all().unwrap(),
        &exp["loss_logdet_mean"],
        FWD,
        FWD,
    );
}

#[test]
fn dropped_and_missing_labels_use_the_mean_class_embedding() {
    let (m, inp, exp) = (
        model(),
        load("tarflow-small/inputs.safetensors"),
        load("tarflow-small/expected.safetensors"),
    );
    let yd = labels(&inp["labels_dropped"]);
    assert!(yd.contains(&-1), "fixture has a dropped label");
    let out = m.forward(&inp["x"], Cond::Labels(&yd)).unwrap();
    assert_close(
        "z_labels_dropped",
        &out.z,
        &exp["z_labels_dropped"],
        FWD,
        FWD,
    );
    assert_close(
        "logdets_labels_dropped",
        &out.logdets,
        &exp["logdets_labels_dropped"],
        FWD,
        FWD,
    );
    let out = m.forward(&inp["x"], Cond::Null).unwrap();
    assert_close("z_y_none", &out.z, &exp["z_y_none"], FWD, FWD);
    assert_close(
        "logdets_y_none",
        &out.logdets,
        &exp["logdets_y_none"],
        FWD,
        FWD,
    );
}

#[test]
fn bits_per_dim_matches_evaluate_bpd() {
    let (m, inp, exp) = (
        model(),
        load("tarflow-small/inputs.safetensors"),
        load("tarflow-small/expected.safetensors"),
    );
    let out = m.forward(&inp["x_dequant"], Cond::Null).unwrap();
    assert_close("bpd_eval.z", &out.z, &exp["bpd_eval.z"], FWD, FWD);
    assert_close(
        "bpd_eval.logdets",
        &out.logdets,
        &exp["bpd_eval.logdets"],
        FWD,
        FWD,
    );
    let bpd_ref = m.bits_per_dim(&out, BpdConvention::Reference).unwrap();
    assert_close("bpd_eval.bpd", &bpd_ref, &exp["bpd_eval.bpd"], FWD, FWD);
    assert_close(
        "bpd_eval.bpd_mean",
        &bpd_ref.mean_all().unwrap(),
        &exp["bpd_eval.bpd_mean"],
        FWD,
        FWD,
    );
    let bpd = m.bits_per_dim(&out, BpdConvention::TrueDims).unwrap();
    assert_close(
        "bpd_eval.bpd_true_ndims",
        &bpd,
        &exp["bpd_eval.bpd_true_ndims"],
        FWD,
        FWD,
    );
    // nll = −prior_log_p/n − logdets (per dim); our NLL is per image in nats.
    let n = (3 * 16 * 16) as f64;
    let nll = (m.nll(&out, true).unwrap() / n).unwrap();
    assert_close("bpd_eval.nll", &nll, &exp["bpd_eval.nll"], FWD, FWD);
    let prior = ((nll.clone() + out.logdets.clone()).unwrap() * (-n)).unwrap();
    assert_close(
        "bpd_eval.prior_log_p",
        &prior,
        &exp["bpd_eval.prior_log_p"],
        1e-2,
        FWD,
    );
    // The per-token decomposition sums to the whole.
    let per_tok = m.nll_per_token(&out, true).unwrap();
    assert_eq!(per_tok.dims(), &[4, 16]);
    assert_close(
        "sum of per-token nll",
        &per_tok.sum(1).unwrap(),
        &m.nll(&out, true).unwrap(),
        1e-2,
        1e-6,
    );
}

fn reverse(m: &TarFlow, z: &Tensor, cond: Cond, opts: ReverseOptions) -> Tensor {
    m.reverse(z, cond, &opts).unwrap()
}

#[test]
fn reverse_matches_reference_in_every_variant() {
    let (m, inp, exp) = (
        model(),
        load("tarflow-small/inputs.safetensors"),
        load("tarflow-small/expected.safetensors"),
    );
    let y = labels(&inp["labels"]);
    let z = &inp["z_sample"];
    let rev = 1e-3;
    let plain = ReverseOptions::default();
    assert_close(
        "reverse",
        &reverse(&m, z, Cond::Labels(&y), plain),
        &exp["reverse"],
        rev,
        0.0,
    );
    let seq = m.reverse_sequence(z, Cond::Labels(&y), &plain).unwrap();
    assert_eq!(seq.len(), 5);
    for (k, s) in seq.iter().enumerate() {
        assert_close(
            &format!("reverse_seq.{k}"),
            s,
            &exp[&format!("reverse_seq.{k}")],
            rev,
            0.0,
        );
    }
    assert_close(
        "reverse_y_none",
        &reverse(&m, z, Cond::Null, plain),
        &exp["reverse_y_none"],
        rev,
        0.0,
    );
    let cfg2 = ReverseOptions {
        guidance: 2.0,
        ..plain
    };
    assert_close(
        "reverse_cfg2",
        &reverse(&m, z, Cond::Labels(&y), cfg2),
        &exp["reverse_cfg2"],
        rev,
        0.0,
    );
    let ann = ReverseOptions {
        annealed: true,
        ..cfg2
    };
    assert_close(
        "reverse_cfg2_annealed",
        &reverse(&m, z, Cond::Labels(&y), ann),
        &exp["reverse_cfg2_annealed"],
        rev,
        0.0,
    );
    let temp = ReverseOptions {
        attn_temp: 1.5,
        ..ann
    };
    assert_close(
        "reverse_cfg2_annealed_attntemp1p5",
        &reverse(&m, z, Cond::Labels(&y), temp),
        &exp["reverse_cfg2_annealed_attntemp1p5"],
        rev,
        0.0,
    );
    let guide_a = ReverseOptions {
        guide_what: GuideWhat::Alpha,
        ..cfg2
    };
    assert_close(
        "reverse_cfg2_guide_a",
        &reverse(&m, z, Cond::Labels(&y), guide_a),
        &exp["reverse_cfg2_guide_a"],
        rev,
        0.0,
    );
}

#[test]
fn round_trip_reproduces_the_input() {
    let (m, inp, exp) = (
        model(),
        load("tarflow-small/inputs.safetensors"),
        load("tarflow-small/expected.safetensors"),
    );
    let y = labels(&inp["labels"]);
    let out = m.forward(&inp["x"], Cond::Labels(&y)).unwrap();
    let back = m
        .reverse(&out.z, Cond::Labels(&y), &ReverseOptions::default())
        .unwrap();
    assert_close("roundtrip_x", &back, &exp["roundtrip_x"], 1e-4, 0.0);
    assert_close("roundtrip vs x", &back, &inp["x"], 1e-5, 0.0);
}

#[test]
fn denoising_gradient_and_step_match_reference() {
    let (m, inp, exp) = (
        model(),
        load("tarflow-small/inputs.safetensors"),
        load("tarflow-small/expected.safetensors"),
    );
    let y = labels(&inp["labels"]);
    let x = &inp["denoise_x"];
    let (loss, grad) = m.loss_input_grad(x, Cond::Labels(&y)).unwrap();
    assert_close("denoise_loss", &loss, &exp["denoise_loss"], FWD, FWD);
    assert_close("denoise_grad", &grad, &exp["denoise_grad"], 1e-7, 1e-3);
    let sigma = exp["denoise_noise_std"].to_scalar::<f32>().unwrap() as f64;
    let out = m.denoise(x, Cond::Labels(&y), sigma, 1.0).unwrap();
    assert_close("denoise_out", &out, &exp["denoise_out"], 1e-4, 0.0);
}

#[test]
fn parameter_gradients_match_reference() {
    let ckpt = common::reference_checkpoint();
    let (m, vars) = ckpt.trainable_model(&Device::Cpu, DType::F32).unwrap();
    let inp = load("tarflow-small/inputs.safetensors");
    let grads_ref = load("tarflow-small/grads.safetensors");
    let y = labels(&inp["labels"]);
    let loss = TarFlow::loss(&m.forward(&inp["x"], Cond::Labels(&y)).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let data = vars.data().lock().unwrap();
    assert_eq!(data.len(), grads_ref.len(), "one gradient per parameter");
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let r = &grads_ref[name];
        let scale = r
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let atol = 1e-3
            * scale
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
            + 1e-9;
        assert_close(&format!("grad {name}"), g, r, atol, 1e-3);
    }
}
