//! The fused Linear and transformer layer equal the composed candle ops in values and gradients
//! (f32, random odd shapes), and a whole model's forward, parameter gradients and every sampling variant agree
//! with the kernel switch on and off.

mod common;

use approx::{abs_diff_eq, assert_abs_diff_eq};
use candle_core::{DType, Device, Tensor, Var, D};
use common::{random_checkpoint, random_images, values};
use tarflow::flows::kernels;
use tarflow::flows::rng::{randn, seeded};
use tarflow::{Cond, ModelConfig, TarFlow};

/// The kernel switch is process-wide: the tests that flip it take turns.
static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `f` with the CPU kernels and fast path on, then off (the composed ops): (fast, composed).
fn on_both_paths<T>(f: impl Fn() -> T) -> (T, T) {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    kernels::set_enabled(true);
    let fast = f();
    kernels::set_enabled(false);
    let composed = f();
    kernels::set_enabled(true);
    (fast, composed)
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    randn(&mut seeded(seed), shape.to_vec(), 1.0, &Device::Cpu).unwrap()
}

/// max |a − b| ≤ rel·max|b| + 1e-6.
fn close(name: &str, a: &Tensor, b: &Tensor, rel: f64) {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert_abs_diff_eq!(
        values(a).named(name),
        values(b),
        epsilon = rel * scale + 1e-6
    );
}

/// Values and gradients (w.r.t. every input) of `f` on the fused and the composed functions,
/// under the loss Σ f(inputs)·r with a random r.
fn check(
    name: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
    rel: f64,
) {
    let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = rand(y.dims(), 99);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|v| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        (y, grads)
    };
    let (ya, ga) = run(&fused);
    let (yb, gb) = run(&composed);
    close(&format!("{name} value"), &ya, &yb, rel);
    for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
        close(&format!("{name} grad of input {i}"), a, b, rel);
    }
}

#[test]
fn linear_matches_composed_ops() {
    for (rows, i, o) in [(7, 13, 5), (2 * 65, 64, 96), (1, 3, 1)] {
        let inputs = [rand(&[rows, i], 5), rand(&[o, i], 6), rand(&[o], 7)];
        check(
            "linear",
            &inputs,
            |t| kernels::linear::linear(&t[0], &t[1], &t[2]).unwrap(),
            |t| {
                t[0].matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            1e-5,
        );
    }
}

/// LayerNorm (eps 1e-5) over the last dimension in composed ops.
fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

fn composed_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    x.broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

/// Causal attention of the packed projection (N, T, 3C) in composed ops.
fn composed_attention(qkv: &Tensor, heads: usize, hd: usize, scale: f64) -> Tensor {
    let (n, t, _) = qkv.dims3().unwrap();
    let qkv = qkv
        .reshape((n, t, 3 * heads, hd))
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let part = |i: usize| {
        qkv.narrow(1, i * heads, heads)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (part(0), part(1), part(2));
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t <= i / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let att = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let p = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((n, t, heads * hd))
        .unwrap()
}

/// The fused layer (one autograd node: LayerNorm, attention, GELU MLP, both residuals) equals
/// the composed ops in its output and the gradients of its input and all twelve weights, on
/// odd shapes, one position, an attention temperature, sequences long enough that the causal
/// products split at the diagonal (T > 32), and one long enough that the probabilities are
/// recomputed.
#[test]
fn the_fused_transformer_layer_matches_composed_ops() {
    for (n, t, heads, hd, ratio, temp) in [
        (3, 5, 3, 7, 2, 1.0),
        (2, 16, 2, 32, 4, 1.3),
        (1, 1, 1, 4, 1, 1.0),
        (2, 37, 2, 16, 2, 1.1),
        // T > 3·hd: the backward recomputes the probabilities instead of keeping them.
        (2, 13, 2, 4, 2, 0.9),
        (1, 49, 2, 8, 2, 1.0),
    ] {
        let c = heads * hd;
        let h = c * ratio;
        let shapes: [&[usize]; 13] = [
            &[n, t, c],
            &[c],
            &[c],
            &[3 * c, c],
            &[3 * c],
            &[c, c],
            &[c],
            &[c],
            &[c],
            &[h, c],
            &[h],
            &[c, h],
            &[c],
        ];
        let inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (rand(s, 20 + i as u64) * if i == 0 { 2.0 } else { 0.3 }).unwrap())
            .collect();
        let scale = 1.0 / ((hd as f64).sqrt() * temp);
        check(
            "layer",
            &inputs,
            |w| {
                let parts = tarflow::flows::kernels::LayerParts {
                    ln1: (&w[1], &w[2]),
                    qkv: (&w[3], &w[4]),
                    proj: (&w[5], &w[6]),
                    ln2: (&w[7], &w[8]),
                    fc1: (&w[9], &w[10]),
                    fc2: (&w[11], &w[12]),
                    head_dim: hd,
                    packed: None,
                };
                kernels::layer::layer(&w[0], &parts, temp, None).unwrap()
            },
            |w| {
                let qkv = composed_linear(&composed_layer_norm(&w[0], &w[1], &w[2]), &w[3], &w[4]);
                let att = composed_attention(&qkv, heads, hd, scale);
                let x2 = (&w[0] + composed_linear(&att, &w[5], &w[6])).unwrap();
                let u = composed_linear(&composed_layer_norm(&x2, &w[7], &w[8]), &w[9], &w[10]);
                (&x2 + composed_linear(&u.gelu_erf().unwrap(), &w[11], &w[12])).unwrap()
            },
            1e-5,
        );
    }
}

/// Forward and every parameter gradient with the kernels on and off, with learned positions
/// and with rotary ones in both pairings (the fused layer rotates in its forward and rotates
/// back in its backward). The switch is global; the op tests above call the kernels directly
/// and do not read it.
#[test]
fn a_model_trains_the_same_with_and_without_fused_kernels() {
    for (rope, halves) in [(false, false), (true, false), (true, true)] {
        let mut cfg = ModelConfig::new(3, 8, 2, 64, 2, 2, 3);
        cfg.head_dim = 32;
        (cfg.rope, cfg.hf_style_rope) = (rope, halves);
        let ck = random_checkpoint(&cfg, 11);
        let x = random_images(3, 3, 8, 12);
        let y = [0i64, 2, -1];
        let run = || {
            let (m, vm) = ck.trainable_model(&Device::Cpu, DType::F32).unwrap();
            let out = m.forward(&x, Cond::Labels(&y)).unwrap();
            let loss = TarFlow::loss(&out).unwrap();
            let grads = common::param_grads(&cfg, &vm, &loss.backward().unwrap());
            let mut grads: Vec<(String, Tensor)> = grads.into_iter().collect();
            grads.sort_by(|a, b| a.0.cmp(&b.0));
            (out.z, loss, grads)
        };
        let ((z1, l1, g1), (z0, l0, g0)) = on_both_paths(run);
        close("z", &z1, &z0, 1e-5);
        close("loss", &l1, &l0, 1e-5);
        assert_eq!(g1.len(), g0.len(), "parameters with a gradient");
        for ((k, a), (k0, b)) in g1.iter().zip(&g0) {
            assert_eq!(k, k0);
            close(&format!("{k} (rope {rope}, halves {halves})"), a, b, 1e-4);
        }
    }
}

/// The whole-flow CPU training pass (no autograd tape) against candle's composed ops: loss and
/// every parameter gradient through `grads::loss_and_grads`, as the trainer calls it, with
/// labels (some dropped) or none, an affine or volume-preserving head, the latent-norm penalty,
/// two streams and a divisor that is not a power of two. A STARFlow model (start token, final
/// norm, soft-clipped head) is not covered by the pass and takes the tape, fused layers and all.
#[test]
fn the_training_pass_equals_the_composed_ops() {
    use tarflow::train::grads::{loss_and_grads, Pass};
    let tarflow = |nvp: bool| {
        let mut cfg = ModelConfig::new(3, 8, 2, 64, 3, 2, 3);
        cfg.head_dim = 32;
        cfg.nvp = nvp;
        cfg
    };
    for (cfg, labels, latent, covered) in [
        (tarflow(true), [0i64, 2, -1, 1], 0.25, true),
        (tarflow(true), [-1, -1, -1, -1], 0.0, true),
        (tarflow(false), [1, 1, 0, -1], 0.5, true),
        (starflow_config(), [3, 0, -1, 2], 0.25, false),
    ] {
        let ck = random_checkpoint(&cfg, 21);
        let x = random_images(4, 3, cfg.img_size, 22);
        let run = || {
            let (m, vm) = ck.trainable_model(&Device::Cpu, DType::F32).unwrap();
            let covers = m.train_pass_covers();
            let vars: Vec<(String, Var)> = vm
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let Pass::Grads(loss, g) =
                loss_and_grads(&m, &vars, (&x, &labels), 3, 2, latent).unwrap()
            else {
                panic!("non-finite loss")
            };
            let mut grads: Vec<(String, Tensor)> =
                common::param_grads(&cfg, &vm, &g).into_iter().collect();
            grads.sort_by(|a, b| a.0.cmp(&b.0));
            (covers, loss, grads)
        };
        let ((covers, l1, g1), (_, l0, g0)) = on_both_paths(run);
        let what = format!("labels {labels:?}, nvp {}, sos {}", cfg.nvp, cfg.sos);
        assert_eq!(
            covers, covered,
            "whether the training pass covers the model ({what})"
        );
        assert!(
            abs_diff_eq!(l1, l0, epsilon = 1e-5 * l0.abs().max(1.0)),
            "loss {l1} vs {l0} ({what})"
        );
        assert_eq!(g1.len(), g0.len(), "parameters with a gradient ({what})");
        for ((k, a), (k0, b)) in g1.iter().zip(&g0) {
            assert_eq!(k, k0);
            close(&format!("{k} ({what})"), a, b, 1e-4);
        }
    }
}

#[test]
fn the_fast_sampler_equals_the_composed_ops_in_every_variant() {
    use tarflow::flows::GuideWhat;
    use tarflow::ReverseOptions;
    // Odd sizes: 3 channels of 6×6 in 3×3 patches (27 dims), 2 heads of 32, 5 samples, a
    // volume-preserving variant and an unconditional one.
    let mut shapes = vec![];
    let mut c = ModelConfig::new(3, 6, 3, 64, 3, 2, 4);
    c.head_dim = 32;
    shapes.push(c.clone());
    c.nvp = false;
    shapes.push(c.clone());
    c.nvp = true;
    c.num_classes = 0;
    shapes.push(c);
    // 49 tokens (the step's scores in whole 16-position chunks and single ones after them) with
    // heads of 64 (its outputs 64 dimensions at a time) and of 66 (both loops' remainders).
    for (width, hd) in [(128, 64), (132, 66)] {
        let mut c = ModelConfig::new(1, 14, 2, width, 2, 1, 4);
        c.head_dim = hd;
        shapes.push(c);
    }
    for cfg in shapes {
        let ck = random_checkpoint(&cfg, 3);
        let m = ck.model(&Device::Cpu, DType::F32).unwrap();
        let (t, d) = (cfg.num_tokens(), cfg.patch_dim());
        let z = tarflow::flows::rng::randn(
            &mut tarflow::flows::rng::seeded(9),
            (5, t, d),
            1.0,
            &Device::Cpu,
        )
        .unwrap();
        let y = [0i64, 3, -1, 2, 1];
        let conds: Vec<Cond> = if cfg.num_classes > 0 {
            vec![Cond::Labels(&y), Cond::Null]
        } else {
            vec![Cond::Null]
        };
        for cond in conds {
            let mut variants = vec![ReverseOptions::default()];
            if cfg.num_classes > 0 {
                for (annealed, guide_what, attn_temp) in [
                    (false, GuideWhat::Both, 1.0),
                    (true, GuideWhat::Both, 1.5),
                    (false, GuideWhat::Alpha, 1.0),
                    (true, GuideWhat::Mu, 0.8),
                ] {
                    variants.push(ReverseOptions {
                        guidance: 2.0,
                        annealed,
                        guide_what,
                        attn_temp,
                        ..Default::default()
                    });
                }
            }
            for o in variants {
                let (a, b) = on_both_paths(|| m.reverse(&z, cond, &o).unwrap());
                let what = format!("nvp {} classes {} {o:?}", cfg.nvp, cfg.num_classes);
                assert_abs_diff_eq!(values(&a).named(what), values(&b), epsilon = 1e-4);
            }
        }
    }
}

#[test]
fn the_fast_forward_equals_the_composed_ops() {
    // 4 tokens, and 49 (the tiny benchmark's count: the causal products split at row 32).
    for (img, patch, nvp) in [(6, 3, true), (6, 3, false), (14, 2, true)] {
        let mut cfg = ModelConfig::new(3, img, patch, 64, 3, 2, 4);
        cfg.head_dim = 32;
        cfg.nvp = nvp;
        let ck = random_checkpoint(&cfg, 5);
        let m = ck.model(&Device::Cpu, DType::F32).unwrap();
        // Ten images: the fast path runs the two halves at once, the composed ops the batch.
        let x = random_images(10, 3, img, 2);
        let y = [0i64, 3, -1, 2, 1, 1, -1, 0, 2, 3];
        for cond in [Cond::Labels(&y), Cond::Null] {
            let (a, b) = on_both_paths(|| m.forward(&x, cond).unwrap());
            assert_eq!(a.z.dims(), b.z.dims());
            assert_abs_diff_eq!(values(&a.z).named("z"), values(&b.z), epsilon = 1e-4);
            assert_abs_diff_eq!(
                values(&a.logdets).named("logdets"),
                values(&b.logdets),
                epsilon = 1e-5
            );
            for (p, q) in a.blocks.iter().zip(&b.blocks) {
                assert_abs_diff_eq!(values(&p.out), values(&q.out), epsilon = 1e-4);
                assert_abs_diff_eq!(values(&p.alpha), values(&q.alpha), epsilon = 1e-5);
                assert_abs_diff_eq!(values(&p.proj_out), values(&q.proj_out), epsilon = 1e-5);
                assert_abs_diff_eq!(values(&p.logdet), values(&q.logdet), epsilon = 1e-6);
            }
        }
    }
}

/// A STARFlow model with every option on: per-block depths, the STARFlow permutation, the
/// softplus head, the start token, the final norm and the class in the deep block only.
fn starflow_config() -> ModelConfig {
    let mut c = ModelConfig::new(3, 6, 3, 64, 3, 1, 4);
    c.head_dim = 32;
    c.layers = Some(vec![1, 1, 2]);
    c.permutation = tarflow::flows::config::Permutation::Starflow;
    c.scale = tarflow::flows::config::ScaleHead::Softplus;
    c.sos = true;
    c.final_norm = true;
    c.cond_deep_only = true;
    c
}

#[test]
fn every_starflow_option_rule_and_guide_blocks_run_the_same_on_both_paths() {
    use tarflow::flows::{GuidanceRule, GuideWhat};
    use tarflow::ReverseOptions;
    let base = starflow_config();
    // Each option alone on a TarFlow, then all together.
    let mut configs = vec![base.clone()];
    for k in 0..5 {
        let mut c = ModelConfig::new(3, 6, 3, 64, 3, 2, 4);
        c.head_dim = 32;
        match k {
            0 => c.scale = base.scale,
            1 => c.sos = true,
            2 => c.final_norm = true,
            3 => c.cond_deep_only = true,
            _ => c.permutation = base.permutation,
        }
        configs.push(c);
    }
    for cfg in configs {
        let ck = random_checkpoint(&cfg, 7);
        let m = ck.model(&Device::Cpu, DType::F32).unwrap();
        let (t, d) = (cfg.num_tokens(), cfg.patch_dim());
        let z = randn(&mut seeded(4), (5, t, d), 1.0, &Device::Cpu).unwrap();
        let y = [0i64, 3, -1, 2, 1];
        let mut variants = vec![ReverseOptions::default()];
        for (rule, annealed, guide_what, attn_temp, guide_blocks) in [
            (GuidanceRule::Linear, true, GuideWhat::Both, 1.5, 0),
            (GuidanceRule::Linear, false, GuideWhat::Mu, 1.0, 1),
            (GuidanceRule::Gaussian, false, GuideWhat::Both, 1.0, 0),
            (GuidanceRule::Gaussian, false, GuideWhat::Both, 0.8, 2),
        ] {
            variants.push(ReverseOptions {
                guidance: 1.5,
                rule,
                annealed,
                guide_what,
                attn_temp,
                guide_blocks,
            });
        }
        for o in variants {
            let (a, b) = on_both_paths(|| m.reverse(&z, Cond::Labels(&y), &o).unwrap());
            let what = format!("{cfg:?} {o:?}");
            assert_abs_diff_eq!(values(&a).named(what), values(&b), epsilon = 1e-4);
        }
        let x = random_images(5, 3, 6, 2);
        let (a, b) = on_both_paths(|| m.forward(&x, Cond::Labels(&y)).unwrap());
        assert_abs_diff_eq!(
            values(&a.z).named("{cfg:?}: z"),
            values(&b.z),
            epsilon = 1e-4
        );
        assert_abs_diff_eq!(
            values(&a.logdets).named("{cfg:?}: logdets"),
            values(&b.logdets),
            epsilon = 1e-5
        );
        // The inverse of the forward pass on the kernels.
        let back = m
            .reverse(&a.z, Cond::Labels(&y), &ReverseOptions::default())
            .unwrap();
        let x = x.to_dtype(DType::F32).unwrap();
        let what = format!("{cfg:?}: round trip");
        assert_abs_diff_eq!(values(&back).named(what), values(&x), epsilon = 1e-3);
    }
}

/// `kernels::as_one_of` (a pass's share of the threads) changes how a product is split, never
/// its values: the forward on a 4-thread pool, its products on all four threads and on one,
/// gives the same bits. Each product is large enough for the `gemm` crate to use the threads.
#[test]
fn a_products_thread_share_leaves_its_values() {
    // The other tests flip the kernel switch: both passes must run on the kernels.
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = ModelConfig::new(3, 16, 2, 128, 2, 1, 0);
    let model = random_checkpoint(&cfg, 11)
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let x = random_images(4, 3, 16, 12);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let z = |passes: usize| {
        pool.install(|| kernels::as_one_of(passes, || model.forward(&x, Cond::Null)))
            .unwrap()
            .z
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (all, one) = (z(1), z(4));
    assert!(all.iter().all(|v| v.is_finite()));
    assert_eq!(
        all, one,
        "the forward's values moved with its products' thread count"
    );
}
