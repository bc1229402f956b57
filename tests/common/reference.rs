//! The golden-vector checks of Apple's PyTorch ml-tarflow (tests/fixtures/tarflow-small), written
//! once and run on any device and dtype: `tests/reference.rs` on the CPU kernels in f32,
//! `tests/composed.rs` on candle's composed ops (the CUDA/Metal path) in f32 and bf16, and the
//! GPU check (`scripts/gpu-check.sh`) on CUDA.

use super::{labels, load};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use tarflow::flows::model::{BpdConvention, GuideWhat};
use tarflow::{Cond, ReverseOptions, TarFlow};

/// Where and in what precision the checks run, and how close they must come.
#[derive(Debug, Clone)]
pub struct Prec {
    /// The device the model and inputs live on.
    pub device: Device,
    /// The model's dtype.
    pub dtype: DType,
    /// Absolute and relative tolerance of forward outputs (z, log-dets, block outputs, loss).
    pub fwd: f64,
    /// Absolute tolerance of the inverse (pixels in [-1, 1]).
    pub rev: f64,
    /// Tolerance of the parameter gradients, relative to each gradient's largest entry.
    pub grad: f64,
    /// Relative tolerance of bits/dim.
    pub bpd_rel: f64,
}

impl Prec {
    /// f32 on `device`: the reference tolerances.
    pub fn f32(device: Device) -> Self {
        Self {
            device,
            dtype: DType::F32,
            fwd: 1e-4,
            rev: 1e-3,
            grad: 1e-3,
            bpd_rel: 1e-4,
        }
    }

    /// bf16 on `device` (weights and activations bf16; LayerNorm statistics, the exp of the
    /// log-scales, log-dets and the NLL in f32). bf16 keeps 8 significant bits (relative step
    /// 2⁻⁸ ≈ 3.9e-3), and every layer rounds its output once more, so the block outputs drift
    /// by a few such steps through 8 transformer layers. Measured on the CPU (README, "GPU
    /// path"): block outputs and z 1.4e-2, log-dets 1.2e-4, the plain inverse 3.7e-2 and the
    /// α-only guided one 8.2e-2 (guidance extrapolates the rounding error by 1 + w = 3). The
    /// tolerances are about 3× those; bits/dim must hold 5e-3 relative (the bar; measured
    /// 3e-5); parameter gradients 3.3e-2 of their largest entry (a bias of the MLP).
    pub fn bf16(device: Device) -> Self {
        Self {
            dtype: DType::BF16,
            fwd: 0.04,
            rev: 0.25,
            grad: 0.1,
            bpd_rel: 5e-3,
            ..Self::f32(device)
        }
    }

    /// `t` on this device in this dtype, cast on the host first (floats), or left on the host
    /// (labels: i64, which no GPU path takes as a tensor).
    fn put(&self, t: &Tensor) -> Tensor {
        match t.dtype().is_float() {
            true => tarflow::flows::device::upload(t, &self.device, self.dtype).unwrap(),
            false => t.clone(),
        }
    }

    /// [`super::assert_close`], the name tagged with the dtype.
    fn close(&self, name: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
        super::assert_close(&format!("[{:?}] {name}", self.dtype), a, b, atol, rtol);
    }

    /// The reference model on this device in this dtype.
    pub fn model(&self) -> TarFlow {
        super::reference_checkpoint()
            .model(&self.device, self.dtype)
            .unwrap()
    }

    fn fixtures(&self) -> (TarFlow, HashMap<String, Tensor>, HashMap<String, Tensor>) {
        (
            self.model(),
            load("tarflow-small/inputs.safetensors"),
            load("tarflow-small/expected.safetensors"),
        )
    }
}

/// Forward pass, per-block outputs and the loss against the reference.
pub fn forward(p: &Prec) {
    let (m, inp, exp) = p.fixtures();
    let y = labels(&inp["labels"]);
    let out = m.forward(&p.put(&inp["x"]), Cond::Labels(&y)).unwrap();
    let f = p.fwd;
    p.close("z", &out.z, &exp["z"], f, f);
    p.close("logdets", &out.logdets, &exp["logdets"], f, f);
    for (k, b) in out.blocks.iter().enumerate() {
        for (what, t) in [
            ("block_out", &b.out),
            ("block_logdet", &b.logdet),
            ("block_proj_out", &b.proj_out),
        ] {
            let key = format!("{what}.{k}");
            p.close(&key, t, &exp[&key], f, f);
        }
    }
    let loss = TarFlow::loss(&out).unwrap();
    p.close("loss", &loss, &exp["loss"], f, f);
    p.close(
        "loss_per_sample",
        &TarFlow::loss_per_sample(&out).unwrap(),
        &exp["loss_per_sample"],
        f,
        f,
    );
    let z = out.z.to_dtype(DType::F32).unwrap();
    let mse = (z.sqr().unwrap().mean_all().unwrap() * 0.5).unwrap();
    p.close("loss_mse_z", &mse, &exp["loss_mse_z"], f, f);
    p.close(
        "loss_logdet_mean",
        &out.logdets.mean_all().unwrap(),
        &exp["loss_logdet_mean"],
        f,
        f,
    );
}

/// Dropped labels (−1) and no labels both use the mean class embedding.
pub fn dropped_labels(p: &Prec) {
    let (m, inp, exp) = p.fixtures();
    let x = p.put(&inp["x"]);
    let yd = labels(&inp["labels_dropped"]);
    assert!(yd.contains(&-1), "fixture has a dropped label");
    let f = p.fwd;
    let out = m.forward(&x, Cond::Labels(&yd)).unwrap();
    p.close("z_labels_dropped", &out.z, &exp["z_labels_dropped"], f, f);
    p.close(
        "logdets_labels_dropped",
        &out.logdets,
        &exp["logdets_labels_dropped"],
        f,
        f,
    );
    let out = m.forward(&x, Cond::Null).unwrap();
    p.close("z_y_none", &out.z, &exp["z_y_none"], f, f);
    p.close("logdets_y_none", &out.logdets, &exp["logdets_y_none"], f, f);
}

/// Bits/dim in both conventions, the NLL and its per-token decomposition.
pub fn bits_per_dim(p: &Prec) {
    let (m, inp, exp) = p.fixtures();
    let out = m.forward(&p.put(&inp["x_dequant"]), Cond::Null).unwrap();
    let f = p.fwd;
    p.close("bpd_eval.z", &out.z, &exp["bpd_eval.z"], f, f);
    p.close(
        "bpd_eval.logdets",
        &out.logdets,
        &exp["bpd_eval.logdets"],
        f,
        f,
    );
    let b = p.bpd_rel;
    let bpd_ref = m.bits_per_dim(&out, BpdConvention::Reference).unwrap();
    p.close("bpd_eval.bpd", &bpd_ref, &exp["bpd_eval.bpd"], 0.0, b);
    p.close(
        "bpd_eval.bpd_mean",
        &bpd_ref.mean_all().unwrap(),
        &exp["bpd_eval.bpd_mean"],
        0.0,
        b,
    );
    let bpd = m.bits_per_dim(&out, BpdConvention::TrueDims).unwrap();
    p.close(
        "bpd_eval.bpd_true_ndims",
        &bpd,
        &exp["bpd_eval.bpd_true_ndims"],
        0.0,
        b,
    );
    // nll = −prior_log_p/n − logdets (per dim); our NLL is per image in nats.
    let n = (3 * 16 * 16) as f64;
    let nll = (m.nll(&out, true).unwrap() / n).unwrap();
    p.close("bpd_eval.nll", &nll, &exp["bpd_eval.nll"], 0.0, b);
    let prior =
        ((nll.clone() + out.logdets.to_dtype(DType::F32).unwrap()).unwrap() * (-n)).unwrap();
    p.close(
        "bpd_eval.prior_log_p",
        &prior,
        &exp["bpd_eval.prior_log_p"],
        1e-2,
        b.max(f),
    );
    let per_tok = m.nll_per_token(&out, true).unwrap();
    assert_eq!(per_tok.dims(), &[4, 16]);
    p.close(
        "sum of per-token nll",
        &per_tok.sum(1).unwrap(),
        &m.nll(&out, true).unwrap(),
        1e-2,
        1e-6,
    );
}

/// The inverse in every variant the fixture holds: plain, per-block sequence, unconditional,
/// guidance, annealed, attention temperature, guiding α only.
pub fn reverse(p: &Prec) {
    let (m, inp, exp) = p.fixtures();
    let y = labels(&inp["labels"]);
    let z = p.put(&inp["z_sample"]);
    let rev = |cond, o: ReverseOptions| m.reverse(&z, cond, &o).unwrap();
    let plain = ReverseOptions::default();
    let r = p.rev;
    p.close(
        "reverse",
        &rev(Cond::Labels(&y), plain),
        &exp["reverse"],
        r,
        0.0,
    );
    let seq = m.reverse_sequence(&z, Cond::Labels(&y), &plain).unwrap();
    assert_eq!(seq.len(), 5);
    for (k, s) in seq.iter().enumerate() {
        let key = format!("reverse_seq.{k}");
        p.close(&key, s, &exp[&key], r, 0.0);
    }
    p.close(
        "reverse_y_none",
        &rev(Cond::Null, plain),
        &exp["reverse_y_none"],
        r,
        0.0,
    );
    let cfg2 = ReverseOptions {
        guidance: 2.0,
        ..plain
    };
    let ann = ReverseOptions {
        annealed: true,
        ..cfg2
    };
    let temp = ReverseOptions {
        attn_temp: 1.5,
        ..ann
    };
    let guide_a = ReverseOptions {
        guide_what: GuideWhat::Alpha,
        ..cfg2
    };
    for (key, o) in [
        ("reverse_cfg2", cfg2),
        ("reverse_cfg2_annealed", ann),
        ("reverse_cfg2_annealed_attntemp1p5", temp),
        ("reverse_cfg2_guide_a", guide_a),
    ] {
        p.close(key, &rev(Cond::Labels(&y), o), &exp[key], r, 0.0);
    }
}

/// x → z → x reproduces the input.
pub fn round_trip(p: &Prec) {
    let (m, inp, exp) = p.fixtures();
    let y = labels(&inp["labels"]);
    let out = m.forward(&p.put(&inp["x"]), Cond::Labels(&y)).unwrap();
    let back = m
        .reverse(&out.z, Cond::Labels(&y), &ReverseOptions::default())
        .unwrap();
    let (to_ref, to_x) = if p.dtype == DType::F32 {
        (1e-4, 1e-5)
    } else {
        (p.rev, p.rev)
    };
    p.close("roundtrip_x", &back, &exp["roundtrip_x"], to_ref, 0.0);
    p.close("roundtrip vs x", &back, &inp["x"], to_x, 0.0);
}

/// The denoising gradient, its loss and the Tweedie step.
pub fn denoise(p: &Prec) {
    let (m, inp, exp) = p.fixtures();
    let y = labels(&inp["labels"]);
    let x = p.put(&inp["denoise_x"]);
    let (loss, grad) = m.loss_input_grad(&x, Cond::Labels(&y)).unwrap();
    p.close("denoise_loss", &loss, &exp["denoise_loss"], p.fwd, p.fwd);
    let g_scale = max_abs(&exp["denoise_grad"]);
    let (ga, gr) = if p.dtype == DType::F32 {
        (1e-7, 1e-3)
    } else {
        (p.grad * g_scale, 0.0)
    };
    p.close("denoise_grad", &grad, &exp["denoise_grad"], ga, gr);
    let sigma = exp["denoise_noise_std"].to_scalar::<f32>().unwrap() as f64;
    let out = m.denoise(&x, Cond::Labels(&y), sigma, 1.0).unwrap();
    let tol = if p.dtype == DType::F32 { 1e-4 } else { p.rev };
    p.close("denoise_out", &out, &exp["denoise_out"], tol, 0.0);
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// Every parameter's gradient of the training loss, each within `grad` of its largest entry.
pub fn parameter_gradients(p: &Prec) {
    let ckpt = super::reference_checkpoint();
    let (m, vars) = ckpt.trainable_model(&p.device, p.dtype).unwrap();
    let inp = load("tarflow-small/inputs.safetensors");
    let grads_ref = load("tarflow-small/grads.safetensors");
    let y = labels(&inp["labels"]);
    let loss = TarFlow::loss(&m.forward(&p.put(&inp["x"]), Cond::Labels(&y)).unwrap()).unwrap();
    let grads = super::param_grads(&ckpt.config, &vars, &loss.backward().unwrap());
    assert_eq!(grads.len(), grads_ref.len(), "one gradient per parameter");
    for (name, g) in &grads {
        let r = &grads_ref[name];
        let atol = p.grad * max_abs(r) + 1e-9;
        let rtol = if p.dtype == DType::F32 { 1e-3 } else { 0.0 };
        p.close(&format!("grad {name}"), g, r, atol, rtol);
    }
}
