//! Mathematical properties of the flow: exact log-determinant, invertibility, causality,
//! and gradients reaching every parameter.

mod common;

use approx::{abs_diff_eq, assert_abs_diff_eq, assert_abs_diff_ne};
use candle_core::{DType, Device, Tensor};
use common::{random_checkpoint, random_images, values};
use tarflow::flows::patch::patchify;
use tarflow::{Cond, ModelConfig, ReverseOptions, TarFlow};

fn tiny(classes: usize) -> ModelConfig {
    // 1×4×4 images, 2×2 patches → 4 tokens of 4 dims; one head of 64.
    ModelConfig::new(1, 4, 2, 64, 3, 1, classes)
}

/// The same with every STARFlow option on: deep last block, its permutation, softplus scale,
/// start token, final RMSNorm, conditioning in the deep block only.
fn starflow(mut cfg: ModelConfig) -> ModelConfig {
    use tarflow::flows::config::{Permutation, ScaleHead};
    let mut layers = vec![1; cfg.num_blocks];
    if let Some(l) = layers.last_mut() {
        *l = 2;
    }
    cfg.layers = Some(layers);
    cfg.permutation = Permutation::Starflow;
    cfg.scale = ScaleHead::Softplus;
    cfg.sos = true;
    cfg.final_norm = true;
    cfg.cond_deep_only = true;
    cfg
}

/// log|det A| by Gaussian elimination with partial pivoting.
fn log_abs_det(mut a: Vec<Vec<f64>>) -> f64 {
    let n = a.len();
    let mut acc = 0.0;
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, piv);
        let p = a[col][col];
        assert!(p != 0.0, "singular Jacobian");
        acc += p.abs().ln();
        let pivot_row = a[col].clone();
        for row in a.iter_mut().skip(col + 1) {
            let f = row[col] / p;
            for (v, pv) in row.iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * pv;
            }
        }
    }
    acc
}

#[test]
fn log_det_equals_brute_force_jacobian_in_f64() {
    use tarflow::flows::config::{Permutation, ScaleHead};
    let mut variants = vec![tiny(3)];
    for i in 0..5 {
        let mut c = tiny(3);
        match i {
            0 => c.permutation = Permutation::Starflow,
            1 => c.scale = ScaleHead::Softplus,
            2 => c.sos = true,
            3 => c.final_norm = true,
            _ => c.cond_deep_only = true,
        }
        variants.push(c);
    }
    variants.push(starflow(tiny(3)));
    for cfg in &variants {
        log_det_check(cfg);
    }
}

fn log_det_check(cfg: &ModelConfig) {
    let m = random_checkpoint(cfg, 7)
        .model(&Device::Cpu, DType::F64)
        .unwrap();
    let x = random_images(2, 1, 4, 3).to_dtype(DType::F64).unwrap();
    let y = [1i64, -1];
    let n = cfg.dims_per_image();
    let out = m.forward(&x, Cond::Labels(&y)).unwrap();
    let logdets = (out.logdets * n as f64).unwrap().to_vec1::<f64>().unwrap();
    let xs = x.flatten_from(1).unwrap().to_vec2::<f64>().unwrap();
    let h = 1e-5;
    for (b, xb) in xs.iter().enumerate() {
        let z_of = |v: &[f64]| -> Vec<f64> {
            let t = Tensor::from_vec(v.to_vec(), (1, 1, 4, 4), &Device::Cpu).unwrap();
            let z = m.forward(&t, Cond::Labels(&y[b..b + 1])).unwrap().z;
            z.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        };
        // Column j of the Jacobian by central differences; z is in patch order, which only
        // permutes rows and so leaves |det| unchanged.
        let mut jac = vec![vec![0.0; n]; n];
        for j in 0..n {
            let (mut p, mut q) = (xb.clone(), xb.clone());
            p[j] += h;
            q[j] -= h;
            let (zp, zq) = (z_of(&p), z_of(&q));
            for i in 0..n {
                jac[i][j] = (zp[i] - zq[i]) / (2.0 * h);
            }
        }
        let brute = log_abs_det(jac);
        assert!(
            abs_diff_eq!(brute, logdets[b], epsilon = 1e-6),
            "sample {b}: brute-force log|det J| = {brute}, model = {}",
            logdets[b]
        );
        assert!(logdets[b].abs() > 1e-3, "log-det should be non-trivial");
    }
}

#[test]
fn forward_and_reverse_are_inverse_on_random_inputs() {
    let cfg = ModelConfig::new(3, 8, 2, 64, 4, 2, 5);
    for cfg in [cfg.clone(), starflow(cfg)] {
        inverse_check(&cfg);
    }
}

fn inverse_check(cfg: &ModelConfig) {
    let m = random_checkpoint(cfg, 11)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let x = random_images(3, 3, 8, 5);
    let y = [0i64, 4, -1];
    let out = m.forward(&x, Cond::Labels(&y)).unwrap();
    let back = m
        .reverse(&out.z, Cond::Labels(&y), &ReverseOptions::default())
        .unwrap();
    assert_abs_diff_eq!(values(&back).named("x → z → x"), values(&x), epsilon = 1e-5);
    let z = tarflow::flows::rng::randn(
        &mut tarflow::flows::rng::seeded(9),
        (3, 16, 12),
        1.0,
        &Device::Cpu,
    )
    .unwrap();
    let img = m
        .reverse(&z, Cond::Null, &ReverseOptions::default())
        .unwrap();
    let z2 = m.forward(&img, Cond::Null).unwrap().z;
    assert_abs_diff_eq!(values(&z2).named("z → x → z"), values(&z), epsilon = 1e-5);
    // The flow is not trivially the identity.
    assert_abs_diff_ne!(
        values(&patchify(&x, 2).unwrap()),
        values(&out.z),
        epsilon = 1e-2
    );
}

#[test]
fn each_block_is_causal_in_its_own_token_order() {
    let cfg = ModelConfig::new(1, 8, 2, 64, 2, 2, 0);
    let m = random_checkpoint(&cfg, 13)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let s = patchify(&random_images(1, 1, 8, 1), 2).unwrap(); // (1, 16, 4)
    let t = cfg.num_tokens();
    for block in m.blocks() {
        let base = block.forward(&s, Cond::Null).unwrap();
        for j in [0usize, 5, 14] {
            // Token j in the block's order is canonical token j (identity) or T−1−j (flip).
            let canon = if block.is_flipped() { t - 1 - j } else { j };
            let bump = Tensor::zeros((1, t, 4), DType::F32, &Device::Cpu).unwrap();
            let bump = bump
                .slice_assign(
                    &[0..1, canon..canon + 1, 0..4],
                    &Tensor::ones((1, 1, 4), DType::F32, &Device::Cpu).unwrap(),
                )
                .unwrap();
            let changed = block.forward(&(&s + bump).unwrap(), Cond::Null).unwrap();
            // (α, μ) of tokens ≤ j come from proj_out rows < j after the shift.
            let a0 = base.proj_out.narrow(1, 0, j).unwrap();
            let a1 = changed.proj_out.narrow(1, 0, j).unwrap();
            if j > 0 {
                assert_eq!(
                    values(&a0),
                    values(&a1),
                    "block params of tokens ≤ {j} changed"
                );
            }
            // Tokens after j see the change.
            assert_abs_diff_ne!(
                values(&base.proj_out.narrow(1, j, t - j).unwrap()).named(format!("after {j}")),
                values(&changed.proj_out.narrow(1, j, t - j).unwrap()),
                epsilon = 1e-6
            );
        }
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let cfg = ModelConfig::new(3, 8, 4, 64, 2, 2, 4);
    let (m, vars) = random_checkpoint(&cfg, 17)
        .trainable_model(&Device::Cpu, DType::F32)
        .unwrap();
    let x = random_images(4, 3, 8, 2);
    // A dropped label (−1) must still send gradient to the class table through the mean.
    let y = [0i64, 1, 2, -1];
    let loss = TarFlow::loss(&m.forward(&x, Cond::Labels(&y)).unwrap()).unwrap();
    let packed = vars
        .data()
        .lock()
        .unwrap()
        .keys()
        .filter(|k| k.ends_with(".packed"))
        .count();
    assert_eq!(
        packed, 4,
        "the CPU model trains each of its 4 layers as one variable"
    );
    let by_param = common::param_grads(&cfg, &vars, &loss.backward().unwrap());
    assert_eq!(
        by_param.len(),
        tarflow::flows::params::param_specs(&cfg).len()
    );
    for (name, g) in &by_param {
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm² {norm}"
        );
    }
}

#[test]
fn guidance_changes_the_sample_and_attn_temp_alone_does_not() {
    let cfg = ModelConfig::new(3, 8, 4, 64, 2, 1, 4);
    let m = random_checkpoint(&cfg, 19)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let z = tarflow::flows::rng::randn(
        &mut tarflow::flows::rng::seeded(3),
        (2, 4, 48),
        1.0,
        &Device::Cpu,
    )
    .unwrap();
    let y = [1i64, 2];
    let plain = m
        .reverse(&z, Cond::Labels(&y), &ReverseOptions::default())
        .unwrap();
    let g = ReverseOptions {
        guidance: 1.0,
        ..Default::default()
    };
    let guided = m.reverse(&z, Cond::Labels(&y), &g).unwrap();
    assert_abs_diff_ne!(values(&plain), values(&guided), epsilon = 1e-4);
    // Guidance 0 with any attention temperature is the plain sample.
    let t = ReverseOptions {
        attn_temp: 0.5,
        ..Default::default()
    };
    assert_eq!(
        values(&plain),
        values(&m.reverse(&z, Cond::Labels(&y), &t).unwrap())
    );
}

#[test]
fn sampling_is_seeded_and_temperature_scales_the_noise() {
    use tarflow::flows::rng::seeded;
    let cfg = ModelConfig::new(3, 8, 4, 64, 2, 1, 4);
    let m = random_checkpoint(&cfg, 23)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let opts = ReverseOptions::default();
    let y = [0i64, 3];
    let a = m
        .sample(2, Cond::Labels(&y), 1.0, &mut seeded(5), &opts)
        .unwrap();
    let b = m
        .sample(2, Cond::Labels(&y), 1.0, &mut seeded(5), &opts)
        .unwrap();
    assert_eq!(values(&a), values(&b), "same seed, same samples");
    let c = m
        .sample(2, Cond::Labels(&y), 1.0, &mut seeded(6), &opts)
        .unwrap();
    assert_abs_diff_ne!(values(&a), values(&c), epsilon = 1e-3);
    // Temperature 0 is the reverse of the all-zero latent.
    let cold = m
        .sample(2, Cond::Labels(&y), 0.0, &mut seeded(5), &opts)
        .unwrap();
    let zero = Tensor::zeros((2, 4, 48), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        values(&cold),
        values(&m.reverse(&zero, Cond::Labels(&y), &opts).unwrap())
    );
    assert!(m
        .sample(2, Cond::Null, f64::NAN, &mut seeded(5), &opts)
        .is_err());
}
