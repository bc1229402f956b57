//! The parallel GS-Jacobi inverse equals the sequential one.

mod common;

use approx::assert_abs_diff_eq;
use candle_core::{DType, Device};
use common::{labels, load, random_checkpoint, reference_checkpoint, values};
use tarflow::flows::config::{Permutation, ScaleHead};
use tarflow::flows::{GuidanceRule, GuideWhat, JacobiInit, JacobiOptions};
use tarflow::{Cond, ModelConfig, ReverseOptions};

fn variants() -> Vec<ReverseOptions> {
    let g = ReverseOptions {
        guidance: 2.0,
        ..Default::default()
    };
    vec![
        ReverseOptions::default(),
        g,
        ReverseOptions {
            annealed: true,
            attn_temp: 1.5,
            ..g
        },
        ReverseOptions {
            guide_what: GuideWhat::Alpha,
            ..g
        },
        ReverseOptions {
            rule: GuidanceRule::Gaussian,
            ..g
        },
        ReverseOptions {
            guide_blocks: 1,
            ..g
        },
    ]
}

fn solvers() -> Vec<JacobiOptions> {
    vec![
        JacobiOptions::default(),
        JacobiOptions {
            chunk: 4,
            init: JacobiInit::Zeros,
            ..Default::default()
        },
        JacobiOptions {
            block_chunks: vec![3, 0, 5, 16],
            ..Default::default()
        },
    ]
}

#[test]
fn jacobi_equals_sequential_on_the_reference_model() {
    let m = reference_checkpoint()
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let inp = load("tarflow-small/inputs.safetensors");
    let (y, z) = (labels(&inp["labels"]), &inp["z_sample"]);
    for o in variants() {
        let seq = m.reverse(z, Cond::Labels(&y), &o).unwrap();
        for j in solvers() {
            let (par, rep) = m.reverse_jacobi(z, Cond::Labels(&y), &o, &j).unwrap();
            let what = format!("{o:?} {j:?}");
            assert_abs_diff_eq!(values(&par).named(what), values(&seq), epsilon = 1e-3);
            assert_eq!(rep.len(), 4);
            assert!(rep
                .iter()
                .all(|r| r.iterations >= 1 && r.iterations <= 16 * r.chunks.max(1)));
        }
    }
}

#[test]
fn jacobi_handles_starflow_options() {
    let mut c = ModelConfig::new(3, 8, 2, 64, 3, 1, 4);
    c.layers = Some(vec![1, 1, 2]);
    c.permutation = Permutation::Starflow;
    c.scale = ScaleHead::Softplus;
    c.sos = true;
    c.final_norm = true;
    c.cond_deep_only = true;
    let m = random_checkpoint(&c, 3)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let z = tarflow::flows::rng::randn(
        &mut tarflow::flows::rng::seeded(4),
        (3, 16, 12),
        1.0,
        &Device::Cpu,
    )
    .unwrap();
    let y = [0i64, 3, -1];
    for o in variants() {
        let seq = m.reverse(&z, Cond::Labels(&y), &o).unwrap();
        for j in solvers() {
            let (par, _) = m.reverse_jacobi(&z, Cond::Labels(&y), &o, &j).unwrap();
            let what = format!("{o:?} {j:?}");
            assert_abs_diff_eq!(values(&par).named(what), values(&seq), epsilon = 1e-3);
            let v = par.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }
}
