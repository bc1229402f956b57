//! STARFlow's options checked against values computed by hand on tiny models.

mod common;

use approx::{abs_diff_eq, assert_abs_diff_eq, assert_abs_diff_ne};
use candle_core::{DType, Device, Tensor};
use common::{random_checkpoint, random_images, values};
use tarflow::flows::config::{Permutation, ScaleHead};
use tarflow::flows::model::gaussian_guidance;
use tarflow::flows::params::param_specs;
use tarflow::{Cond, ModelConfig, ReverseOptions};

fn starflow(blocks: usize) -> ModelConfig {
    let mut c = ModelConfig::new(1, 4, 2, 64, blocks, 1, 3);
    let mut layers = vec![1; blocks];
    layers[blocks - 1] = 2;
    c.layers = Some(layers);
    c.permutation = Permutation::Starflow;
    c.scale = ScaleHead::Softplus;
    c.sos = true;
    c.final_norm = true;
    c.cond_deep_only = true;
    c
}

#[test]
fn parameters_and_permutations_follow_starflow() {
    let c = starflow(3);
    let names: Vec<String> = param_specs(&c).into_iter().map(|s| s.name).collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    assert!(
        has("blocks.2.class_embed") && !has("blocks.0.class_embed") && !has("blocks.1.class_embed")
    );
    for k in 0..3 {
        assert!(
            has(&format!("blocks.{k}.sos_embed")) && has(&format!("blocks.{k}.final_norm.weight"))
        );
    }
    assert!(
        has("blocks.2.attn_blocks.1.mlp.norm.weight")
            && !has("blocks.1.attn_blocks.1.mlp.norm.weight")
    );
    // Deep (last) block in raster order; shallow block i reversed when i is even.
    let six = starflow(6);
    let flips: Vec<bool> = (0..6).map(|k| six.block_flipped(k)).collect();
    assert_eq!(flips, [true, false, true, false, true, false]);
    let plain = ModelConfig::new(1, 4, 2, 64, 4, 1, 0);
    let flips: Vec<bool> = (0..4).map(|k| plain.block_flipped(k)).collect();
    assert_eq!(flips, [false, true, false, true]);
    let mut none = plain.clone();
    none.permutation = Permutation::None;
    assert!((0..4).all(|k| !none.block_flipped(k)));
    // TarFlow configs serialise exactly as before (checkpoints unchanged).
    let json = serde_json::to_string(&plain).unwrap();
    assert!(
        !json.contains("permutation") && !json.contains("sos"),
        "{json}"
    );
}

#[test]
fn softplus_head_and_start_token_match_hand_values() {
    let c = starflow(2);
    let mut ck = random_checkpoint(&c, 1);
    // A zero projection leaves only the bias: every token gets the same (a, μ) per dimension.
    let (d, dev) = (c.patch_dim(), Device::Cpu);
    let bias: Vec<f32> = (0..2 * d).map(|i| i as f32 * 0.7 - 2.5).collect();
    ck.tensors.insert(
        "blocks.0.proj_out.weight".into(),
        Tensor::zeros((2 * d, 64), DType::F32, &dev).unwrap(),
    );
    ck.tensors.insert(
        "blocks.0.proj_out.bias".into(),
        Tensor::new(bias.as_slice(), &dev).unwrap(),
    );
    let m = ck.model(&dev, DType::F32).unwrap();
    let x = random_images(2, 1, 4, 3);
    let out = m.forward(&x, Cond::Null).unwrap();
    let xs = tarflow::flows::patch::patchify(&x, 2)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let z0 = out.blocks[0].out.to_vec3::<f32>().unwrap();
    let soft = |v: f32| 4.0 * (v / 4.0).tanh();
    let mut sum_log_sigma = 0.0;
    for e in 0..d {
        let a = soft(bias[e]);
        let mu = soft(bias[d + e]);
        let sigma = (1.0 + (a + 0.541_324_85).exp()).ln();
        sum_log_sigma += sigma.ln();
        // With a start token, token 0 is transformed too.
        for t in 0..4 {
            let want = (xs[1][t][e] - mu) / sigma;
            assert!(
                abs_diff_eq!(z0[1][t][e], want, epsilon = 1e-5),
                "t {t} e {e}: {} vs {want}",
                z0[1][t][e]
            );
        }
    }
    let ld = out.blocks[0].logdet.to_vec1::<f32>().unwrap();
    let want = -sum_log_sigma / d as f32;
    assert!(
        abs_diff_eq!(ld[1], want, epsilon = 1e-5),
        "{} vs {want}",
        ld[1]
    );
}

#[test]
fn rms_norm_matches_hand_values() {
    use candle_nn::VarBuilder;
    let dev = Device::Cpu;
    let w = Tensor::new(&[0f32, 1.0], &dev).unwrap();
    let vb = VarBuilder::from_tensors(
        std::collections::HashMap::from([("weight".to_string(), w)]),
        DType::F32,
        &dev,
    );
    let n = tarflow::flows::layers::RmsNorm::new(2, vb).unwrap();
    let y = n
        .forward(&Tensor::new(&[[3f32, 4.0]], &dev).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let r = 1.0 / (12.5f32 + 1e-6).sqrt();
    assert!(
        (y[0][0] - 3.0 * r).abs() < 1e-6 && (y[0][1] - 8.0 * r).abs() < 1e-6,
        "{y:?}"
    );
}

#[test]
fn gaussian_guidance_matches_the_closed_form() {
    let dev = Device::Cpu;
    let t = |v: f32| Tensor::new(&[v], &dev).unwrap();
    // σc = 1, σu = 2, w = 1: s = 0.25, 1 + w − ws = 1.75.
    let (a, mu) = gaussian_guidance(&t(0.0), &t(1.0), &t(2f32.ln()), &t(3.0), 1.0).unwrap();
    let (a, mu) = (
        a.to_vec1::<f32>().unwrap()[0],
        mu.to_vec1::<f32>().unwrap()[0],
    );
    assert!(
        abs_diff_eq!(a, (-0.5 * 1.75f32.ln()), epsilon = 1e-6),
        "{a}"
    );
    assert!(
        abs_diff_eq!(mu, (2.0 - 0.75) / 1.75, epsilon = 1e-6),
        "{mu}"
    );
    // σc ≥ σu: s clips to 1 and the rule is plain CFG on μ with σ unchanged.
    let (a, mu) = gaussian_guidance(&t(2f32.ln()), &t(1.0), &t(0.0), &t(3.0), 2.0).unwrap();
    assert_abs_diff_eq!(a.to_vec1::<f32>().unwrap()[0], 2f32.ln(), epsilon = 1e-6);
    assert_abs_diff_eq!(
        mu.to_vec1::<f32>().unwrap()[0],
        (3.0 * 1.0 - 2.0 * 3.0),
        epsilon = 1e-5
    );
}

#[test]
fn only_the_deep_block_sees_the_label() {
    let c = starflow(3);
    let m = random_checkpoint(&c, 4)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let x = random_images(2, 1, 4, 5);
    let a = m.forward(&x, Cond::Labels(&[0, 1])).unwrap();
    let b = m.forward(&x, Cond::Labels(&[2, 2])).unwrap();
    assert_eq!(values(&a.blocks[0].out), values(&b.blocks[0].out));
    assert_eq!(values(&a.blocks[1].out), values(&b.blocks[1].out));
    assert_abs_diff_ne!(
        values(&a.blocks[2].out),
        values(&b.blocks[2].out),
        epsilon = 1e-4
    );
}

#[test]
fn guidance_rules_and_block_selection() {
    use tarflow::flows::GuidanceRule;
    let mut c = ModelConfig::new(1, 4, 2, 64, 3, 1, 3);
    c.sos = true;
    c.scale = ScaleHead::Softplus;
    let m = random_checkpoint(&c, 6)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let z = tarflow::flows::rng::randn(
        &mut tarflow::flows::rng::seeded(2),
        (2, 4, 4),
        1.0,
        &Device::Cpu,
    )
    .unwrap();
    let y = [1i64, 2];
    let run = |o: ReverseOptions| m.reverse(&z, Cond::Labels(&y), &o).unwrap();
    let plain = run(ReverseOptions::default());
    let lin = ReverseOptions {
        guidance: 3.0,
        ..Default::default()
    };
    let all = run(lin);
    assert_eq!(
        values(&run(ReverseOptions {
            guide_blocks: 3,
            ..lin
        })),
        values(&all)
    );
    let top = run(ReverseOptions {
        guide_blocks: 1,
        ..lin
    });
    assert_abs_diff_ne!(values(&top), values(&plain), epsilon = 1e-4);
    assert_abs_diff_ne!(values(&top), values(&all), epsilon = 1e-4);
    let gauss = run(ReverseOptions {
        rule: GuidanceRule::Gaussian,
        ..lin
    });
    assert_abs_diff_ne!(values(&gauss), values(&all), epsilon = 1e-4);
    assert_abs_diff_ne!(values(&gauss), values(&plain), epsilon = 1e-4);
    // w = 0 is no guidance under either rule.
    let g0 = run(ReverseOptions {
        rule: GuidanceRule::Gaussian,
        guidance: 0.0,
        ..lin
    });
    assert_eq!(values(&g0), values(&plain));
}

#[test]
fn latent_norm_sums_the_intermediate_outputs() {
    let c = starflow(3);
    let m = random_checkpoint(&c, 8)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let out = m.forward(&random_images(2, 1, 4, 9), Cond::Null).unwrap();
    let got = tarflow::TarFlow::latent_norm(&out)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mean_sq = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let want = mean_sq(&out.blocks[0].out) + mean_sq(&out.blocks[1].out);
    assert!(
        abs_diff_eq!(got, want, epsilon = 1e-6 * want.abs().max(1.0)),
        "{got} vs {want}"
    );
}
