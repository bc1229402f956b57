//! Bad input gives a clear error naming the file, key or value — never a panic.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load};
use std::collections::HashMap;
use tarflow::{Checkpoint, Cond, ReverseOptions};

fn write_state_dict(
    dir: &std::path::Path,
    name: &str,
    t: &HashMap<String, Tensor>,
) -> std::path::PathBuf {
    let p = dir.join(name);
    candle_core::safetensors::save(t, &p).unwrap();
    p
}

fn import_err(path: &std::path::Path) -> String {
    Checkpoint::import(path, 16, 4, None, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

#[test]
fn checkpoint_with_missing_extra_or_misshaped_keys_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = load("tarflow-small/model.safetensors");

    let mut t = good.clone();
    t.remove("blocks.2.attn_blocks.1.mlp.norm.bias");
    let p = write_state_dict(dir.path(), "missing.safetensors", &t);
    let e = import_err(&p);
    assert!(
        e.contains("missing.safetensors")
            && e.contains("missing key `blocks.2.attn_blocks.1.mlp.norm.bias`"),
        "{e}"
    );

    let mut t = good.clone();
    t.insert(
        "blocks.0.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = import_err(&write_state_dict(dir.path(), "extra.safetensors", &t));
    assert!(e.contains("unexpected key `blocks.0.extra.weight`"), "{e}");

    let mut t = good.clone();
    t.insert(
        "blocks.1.attn_blocks.0.mlp.main.0.weight".into(),
        Tensor::zeros((100, 128), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = import_err(&write_state_dict(dir.path(), "shape.safetensors", &t));
    assert!(
        e.contains(
            "`blocks.1.attn_blocks.0.mlp.main.0.weight` has shape [100, 128], expected [512, 128]"
        ),
        "{e}"
    );

    // Wrong image geometry for the weights.
    let e = Checkpoint::import(
        fixture("tarflow-small/model.safetensors"),
        32,
        4,
        None,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("pos_embed") && e.contains("64 tokens"), "{e}");
    let e = Checkpoint::import(
        fixture("tarflow-small/model.safetensors"),
        16,
        4,
        Some(1),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("patch dim"), "{e}");

    // A tarflow checkpoint whose config does not match its tensors.
    let ckpt = common::reference_checkpoint();
    let mut cfg = ckpt.config.clone();
    cfg.num_blocks = 5;
    let e = Checkpoint::from_tensors(
        cfg,
        ckpt.tensors.clone(),
        std::path::Path::new("x.safetensors"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing key `blocks.4.proj_in.weight`"), "{e}");
}

#[test]
fn files_that_are_not_state_dicts_are_rejected_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("garbage.pth", b"\x80\x02this is not a zip pickle".to_vec()),
        ("empty.pth", Vec::new()),
        ("text.safetensors", b"hello world, not safetensors".to_vec()),
        (
            "zip.pth",
            b"PK\x03\x04\x14\x00\x00\x00\x08\x00truncated".to_vec(),
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = import_err(&p);
        assert!(e.contains(name), "{name}: {e}");
        let e = Checkpoint::load(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    let e = import_err(&dir.path().join("absent.pth"));
    assert!(e.contains("absent.pth"), "{e}");
    // A raw state_dict given to `load` points to `tarflow import`.
    let e = Checkpoint::load(fixture("tarflow-small/model.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tarflow import"), "{e}");
}

#[test]
fn wrong_images_labels_and_latents_are_explained() {
    let ckpt = common::reference_checkpoint();
    let m = ckpt.model(&Device::Cpu, DType::F32).unwrap();
    let x = Tensor::zeros((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let e = m.forward(&x, Cond::Null).unwrap_err().to_string();
    assert!(
        e.contains("[2, 1, 16, 16]") && e.contains("(N, 3, 16, 16)"),
        "{e}"
    );
    let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&x, Cond::Null).is_err());

    let mut v = vec![0f32; 2 * 3 * 16 * 16];
    v[100] = f32::NAN;
    let x = Tensor::from_vec(v, (2, 3, 16, 16), &Device::Cpu).unwrap();
    let e = m.forward(&x, Cond::Null).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");

    let x = Tensor::zeros((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .forward(&x, Cond::Labels(&[0, 10]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 10") && e.contains("10 classes"), "{e}");
    let e = m.forward(&x, Cond::Labels(&[0])).unwrap_err().to_string();
    assert!(e.contains("1 labels given for a batch of 2"), "{e}");

    // The fast CPU sampler checks labels too (an index past the table would panic).
    let z = Tensor::zeros((2, 16, 48), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .reverse(&z, Cond::Labels(&[11, 0]), &ReverseOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 11"), "{e}");
    let z = Tensor::zeros((2, 16, 12), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .reverse(&z, Cond::Null, &ReverseOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected (N, 16, 48)"), "{e}");
}

#[test]
fn invalid_configs_name_the_key() {
    let mut c = tarflow::ModelConfig::new(3, 16, 5, 128, 4, 2, 0);
    assert!(c.validate().unwrap_err().to_string().contains("patch_size"));
    c.patch_size = 4;
    c.channels = 100;
    assert!(c.validate().unwrap_err().to_string().contains("head_dim"));
    c.channels = 128;
    c.layers = Some(vec![1, 2]);
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("layers has 2 entries"));
    let e = serde_json::from_str::<tarflow::ModelConfig>(r#"{"in_channels":3,"img_size":16,"patch_size":4,"channels":128,"num_blocks":2,"layers_per_block":1,"colour":1}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn a_malicious_pickle_is_refused_and_never_runs() {
    let marker = std::path::Path::new("/tmp/tarflow-pwned");
    let _ = std::fs::remove_file(marker);
    let zipped = fixture("malicious/os-system.pth");
    let e = import_err(&zipped);
    assert!(
        e.contains("os-system.pth") && e.contains("refused") && e.contains("posix.system"),
        "{e}"
    );
    let e = import_err(&fixture("malicious/legacy-os-system.pth"));
    assert!(e.contains("not a zip-format .pth"), "{e}");
    // Through the binary too, with the exit status of an error.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let o = common::tarflow(&[
        "import",
        zipped.to_str().unwrap(),
        "--img-size",
        "16",
        "--patch-size",
        "4",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let t = common::text(&o);
    assert!(t.contains("refused") && t.contains("posix.system"), "{t}");
    assert!(!out.exists(), "nothing written");
    assert!(!marker.exists(), "the pickled command ran");
    // The genuine ml-tarflow file still imports.
    Checkpoint::import(fixture("tiny-pth/tiny.pth"), 8, 2, None, &Device::Cpu).unwrap();
}
