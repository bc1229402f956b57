//! Which engine runs a block: the options a config uses are the keys it writes out beyond its
//! sizes, the CPU engine runs only those it declares, and an option it does not cover is named
//! on stderr while the model runs on the composed ops.

mod common;

use candle_core::{DType, Device};
use tarflow::flows::config::{Permutation, ScaleHead};
use tarflow::flows::engine::{self, options, uncovered, Engine};
use tarflow::flows::kernels::{COVERS, TRAIN_COVERS};
use tarflow::ModelConfig;

fn starflow() -> ModelConfig {
    let mut c = ModelConfig::new(3, 8, 2, 64, 3, 1, 4);
    c.head_dim = 32;
    c.permutation = Permutation::Starflow;
    c.scale = ScaleHead::Softplus;
    c.sos = true;
    c.final_norm = true;
    c
}

#[test]
fn a_configs_options_are_the_keys_it_writes_beyond_its_sizes() {
    let tarflow = ModelConfig::new(1, 8, 2, 32, 2, 1, 0);
    let mut got = options(&tarflow);
    got.sort();
    assert_eq!(got, ["num_classes", "nvp"]);
    let mut got = options(&starflow());
    got.sort();
    assert_eq!(
        got,
        [
            "final_norm",
            "num_classes",
            "nvp",
            "permutation",
            "scale",
            "sos"
        ]
    );
    // The CPU engine runs every option there is today; its training pass only TarFlow's.
    assert_eq!(uncovered(&tarflow, COVERS), None);
    assert_eq!(uncovered(&starflow(), COVERS), None);
    assert_eq!(uncovered(&tarflow, TRAIN_COVERS), None);
    let left = uncovered(&starflow(), TRAIN_COVERS).unwrap_or_default();
    assert!(
        ["final_norm", "scale", "sos"].contains(&left.as_str()),
        "{left}"
    );
}

#[test]
fn an_option_the_engine_does_not_declare_keeps_the_block_composed() {
    let cfg = starflow();
    let all_but_sos: Vec<&str> = COVERS.iter().copied().filter(|&o| o != "sos").collect();
    assert_eq!(uncovered(&cfg, &all_but_sos).as_deref(), Some("sos"));
    let dev = Device::Cpu;
    // An engine without `sos` may not run this block; the real one may, in f32 only.
    assert!(!engine::cpu_may_run_covering(
        &cfg,
        0,
        &dev,
        DType::F32,
        &all_but_sos
    ));
    assert!(engine::cpu_may_run_covering(
        &cfg,
        0,
        &dev,
        DType::F32,
        COVERS
    ));
    assert!(!engine::cpu_may_run(&cfg, 0, &dev, DType::BF16));
    // A loaded block follows that decision (with the process's switch on).
    tarflow::flows::kernels::set_enabled(true);
    let ck = common::random_checkpoint(&cfg, 3);
    for (dtype, want) in [(DType::F32, Engine::Cpu), (DType::BF16, Engine::Composed)] {
        let m = ck.model(&dev, dtype).unwrap();
        assert!(m.blocks().iter().all(|b| b.engine() == want), "{dtype:?}");
        // The training pass covers none of STARFlow's head options.
        assert!(m.blocks().iter().all(|b| b.train_uncovered().is_some()));
    }
}

#[test]
fn training_a_model_the_pass_does_not_cover_says_so_once() {
    let json = serde_json::to_string(&starflow()).unwrap();
    let out = common::tarflow(&[
        "bench", "train", "--config", &json, "--batch", "4", "--iters", "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let said = err
        .lines()
        .filter(|l| l.contains("training pass does not cover the option"))
        .count();
    assert_eq!(said, 1, "{err}");
    let json = serde_json::to_string(&ModelConfig::new(3, 8, 2, 64, 2, 1, 4)).unwrap();
    let out = common::tarflow(&[
        "bench", "train", "--config", &json, "--batch", "4", "--iters", "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("does not cover"), "{err}");
}
