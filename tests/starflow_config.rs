//! `tarflow import --from ml-starflow` from the command line: by `--model-kwargs` (then sample
//! and score reproduce upstream; kwargs that do not fit the weights are named) and by
//! `--starflow-config X.yaml` (ml-starflow's YAML training configs, whose `arguments:` list gives
//! the same model as the `Model(**kwargs)` it builds).

mod common;

use candle_core::Device;
use common::{assert_close, fixture, load, tarflow, text};
use std::path::Path;
use tarflow::flows::import::starflow_config;
use tarflow::flows::starflow_args::{starflow_args, Encoders};
use tarflow::Checkpoint;

/// The `starflow-release` fixture's model as an ml-starflow YAML config would give it: a 64 px
/// image over SD-VAE (÷8 → 8×8 latents of 4 channels), a text encoder this crate does not know
/// (its width comes from --txt-dim), and training arguments that do not shape the model.
const RELEASE_YAML: &str = "arguments:
- img_size: 64
- txt_size: 4
- channel_size: 4
- patch_size: 1
- channels: 64
- head_dim: 32
- layers_per_block: 1 1 2
- noise_std: 0.3
- batch_size: 16
- lr: 6.4e-05
- rope: 1
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- vae: stabilityai/sd-vae-ft-ema
- text: tiny/test-encoder
- cfg: 2.5
- soft_clip: 4
";

/// The switches and sizes of ml-starflow's released text-to-image model (3B, 256 px over
/// SD-VAE, flan-t5-xl text), as its published config lists them.
const T2I_3B_YAML: &str = "arguments:
- no_flip: 1
- fsdp: 1
- img_size: 256
- txt_size: 128
- channel_size: 4
- patch_size: 1
- channels: 3072
- blocks: 6
- layers_per_block: 2 2 2 2 2 24
- noise_std: 0.3
- nvp: 1
- rope: 1
- adaln: 0
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- gradient_checkpoint: 0
- vae: stabilityai/sd-vae-ft-ema
- text: google/flan-t5-xl
- cfg: 2.5
- drop_label: 0.1
- soft_clip: 4
- latent_norm_regularization: 1e-4
";

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Imported from the CLI through the YAML config, the fixture's weights give the same model as
/// through its `Model(**kwargs)`.
#[test]
fn a_yaml_config_imports_the_model_its_kwargs_do() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("release.yaml");
    std::fs::write(&yaml, RELEASE_YAML).unwrap();
    let model = fixture("starflow-release/model.safetensors");
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let o = tarflow(&[
        "import",
        &s(&model),
        "--from",
        "ml-starflow",
        "--starflow-config",
        &s(&yaml),
        "--txt-dim",
        "16",
        "-o",
        &s(&a),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--sigma 0.3"), "{}", text(&o));
    common::import_starflow_release(&b);
    let (a, b) = (
        Checkpoint::load(&a, &Device::Cpu).unwrap(),
        Checkpoint::load(&b, &Device::Cpu).unwrap(),
    );
    assert_eq!(
        serde_json::to_value(&a.config).unwrap(),
        serde_json::to_value(&b.config).unwrap()
    );
    // Without --txt-dim the unknown encoder is named with the flag that fixes it.
    let o = tarflow(&[
        "import",
        &s(&model),
        "--from",
        "ml-starflow",
        "--starflow-config",
        &s(&yaml),
        "-o",
        &s(&dir.path().join("c.safetensors")),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("tiny/test-encoder") && text(&o).contains("--txt-dim"),
        "{}",
        text(&o)
    );
}

/// The released 3B config reads as the model the STARFlow paper describes: 32×32×4 latents at
/// patch 1, six blocks of 2-2-2-2-2-24 layers of width 3072, a 128-token flan-t5-xl prefix in
/// the deep block, about 3 B parameters.
#[test]
fn the_released_t2i_config_is_the_3b_model() {
    let path = Path::new("starflow_3B_t2i_256x256.yaml");
    let args = starflow_args(T2I_3B_YAML, path, Encoders::default()).unwrap();
    assert_eq!(args.noise_std, 0.3);
    assert_eq!(args.text.as_deref(), Some("google/flan-t5-xl"));
    let cfg = starflow_config(&args.kwargs, path).unwrap();
    assert_eq!(
        (cfg.in_channels, cfg.img_size, cfg.patch_size, cfg.channels),
        (4, 32, 1, 3072)
    );
    assert_eq!(cfg.layers.as_deref(), Some(&[2, 2, 2, 2, 2, 24][..]));
    assert_eq!((cfg.txt_size, cfg.txt_dim), (128, 2048));
    assert!(cfg.rope && cfg.sos && cfg.final_norm && cfg.cond_deep_only);
    assert_eq!(cfg.soft_clip(), 4.0);
    let params = cfg.approx_params();
    assert!((2.5e9..4.0e9).contains(&params), "{params}");
}

/// Arguments train.py would refuse, or that build a model this crate does not, are errors that
/// name the argument.
#[test]
fn bad_yaml_configs_name_the_argument() {
    let path = Path::new("bad.yaml");
    let enc = Encoders {
        vae_downsample: None,
        txt_dim: Some(16),
    };
    for (yaml, says) in [
        ("arguments:\n- chanels: 64\n", "unknown argument `chanels`"),
        (
            "arguments:\n- layers_per_block: 2 x\n",
            "`layers_per_block`",
        ),
        ("arguments:\n- vid_size: '16:8'\n", "`vid_size`"),
        ("arguments:\n- vae: me/my-vae\n", "--vae-downsample"),
        (
            "arguments:\n- img_size: 60\n- vae: stabilityai/sd-vae-ft-mse\n",
            "multiple",
        ),
        ("model: {}\n", "no `arguments:`"),
        ("arguments: [\n", "not YAML"),
    ] {
        let e = starflow_args(yaml, path, enc).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains("bad.yaml"), "{yaml}: {e}");
    }
    // A switch the model does not build is refused when the config is turned into a model.
    let args = starflow_args("arguments:\n- use_mm_attn: 1\n", path, enc).unwrap();
    let e = starflow_config(&args.kwargs, path).unwrap_err().to_string();
    assert!(e.contains("use_mm_attn"), "{e}");
}

/// From the command line, as a user would: import the release model by its kwargs, sample
/// with text and guidance from upstream's noise, and score upstream's inputs as raw tensors;
/// both give upstream's numbers.
#[test]
fn import_sample_and_score_from_the_cli_reproduce_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let f = |n: &str| fixture(&format!("starflow-release/{n}"));
    let ck = dir.path().join("release.safetensors");
    let inputs = f("inputs.safetensors");
    let printed = common::import_starflow_release(&ck);
    assert!(printed.contains("4 text tokens"), "{printed}");
    // Upstream's z_in as the noise, in image layout.
    let inp = load("starflow-release/inputs.safetensors");
    let noise = dir.path().join("z.safetensors");
    candle_core::safetensors::save(&[("z", inp["z_in"].clone())].into_iter().collect(), &noise)
        .unwrap();
    let out = dir.path().join("g.safetensors");
    let o = tarflow(&[
        "sample",
        "--checkpoint",
        &s(&ck),
        "--text",
        &s(&inputs),
        "--noise",
        &s(&noise),
        "--guidance",
        "2",
        "--guidance-rule",
        "gaussian",
        "--out-tensor",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let exp = load("starflow-release/expected.safetensors");
    assert_close(
        "cli reverse.guided",
        &got["samples"],
        &exp["reverse.guided"],
        1e-4,
        1e-4,
    );
    // Without --text the model says what it needs.
    let o = tarflow(&[
        "sample",
        "--checkpoint",
        &s(&ck),
        "--num",
        "1",
        "--out-tensor",
        &s(&out),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("--text"),
        "{}",
        text(&o)
    );
    let o = tarflow(&[
        "score",
        "--checkpoint",
        &s(&ck),
        "--tensors",
        &s(&inputs),
        "--text",
        &s(&inputs),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let mean_nats: f64 = rows
        .iter()
        .map(|r| r["nll_nats"].as_f64().unwrap())
        .sum::<f64>()
        / 3.0;
    // −log p(x) per dimension is upstream's loss plus the prior's ½·log 2π.
    let loss = exp["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    let want = (loss + 0.5 * (2.0 * std::f64::consts::PI).ln()) * 256.0;
    approx::assert_abs_diff_eq!(mean_nats, want, epsilon = 1e-3);
    assert_eq!(rows[0]["block_logdet_nats"].as_array().unwrap().len(), 3);
}

/// Kwargs that do not fit the weights are refused with the argument to check, never imported
/// as a different model (head_dim changes no weight's shape: the rotary buffer still says it).
#[test]
fn kwargs_that_do_not_fit_the_weights_name_the_argument() {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("starflow-release/config.json")).unwrap(),
    )
    .unwrap();
    let model = fixture("starflow-release/model.safetensors");
    for (key, value, says) in [
        ("sos", serde_json::json!(false), "check `sos`"),
        (
            "use_final_norm",
            serde_json::json!(false),
            "check `use_final_norm`",
        ),
        ("rope", serde_json::json!(false), "check `rope"),
        ("head_dim", serde_json::json!(16), "check head_dim"),
        (
            "cond_top_only",
            serde_json::json!(false),
            "check `txt_dim, txt_size and cond_top_only",
        ),
        ("use_swiglu", serde_json::json!(true), "check `use_swiglu`"),
        (
            "learnable_self_denoiser",
            serde_json::json!(true),
            "check `learnable_self_denoiser`",
        ),
        (
            "no_such_kwarg",
            serde_json::json!(1),
            "unknown kwarg `no_such_kwarg`",
        ),
    ] {
        let mut kw = cfg["model_kwargs"].clone();
        kw[key] = value;
        let e = Checkpoint::import_starflow(&model, &kw, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
}
