//! Quantised models: the exact-likelihood cost on the reference fixture, invertibility, seeded
//! sampling, the GGUF file, and the errors of files and recipes that do not fit.

mod common;

use approx::assert_abs_diff_eq;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{labels, load, reference_checkpoint, tarflow, text};
use tarflow::flows::quant::{QuantType, Recipe, Rule};
use tarflow::{Checkpoint, Cond, ReverseOptions, TarFlow};

/// Bits/dim of each reference input under `m` (density at the inputs, as training sees them).
fn bpd(m: &TarFlow) -> Vec<f64> {
    let inp = load("tarflow-small/inputs.safetensors");
    let y = labels(&inp["labels"]);
    let out = m.forward(&inp["x"], Cond::Labels(&y)).unwrap();
    let dims = m.config().dims_per_image() as f64 * std::f64::consts::LN_2;
    m.nll(&out, false)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .into_iter()
        .map(|n| n / dims)
        .collect()
}

/// The default recipe of `tarflow quantize --to T`: the affine heads in f16.
fn recipe(t: QuantType) -> Recipe {
    Recipe {
        base: t,
        rules: vec!["*.proj_out=f16".parse().unwrap()],
    }
}

fn quantised(t: QuantType) -> TarFlow {
    reference_checkpoint()
        .quantized(&recipe(t))
        .unwrap()
        .model(&Device::Cpu, DType::F32)
        .unwrap()
}

fn repo(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn max_delta(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn q8_0_moves_the_reference_bits_per_dim_by_less_than_its_bound() {
    let f32_bpd = bpd(&reference_checkpoint()
        .model(&Device::Cpu, DType::F32)
        .unwrap());
    let q8 = max_delta(&f32_bpd, &bpd(&quantised(QuantType::Q8_0)));
    let q4 = max_delta(&f32_bpd, &bpd(&quantised(QuantType::Q4_0)));
    let f16 = max_delta(&f32_bpd, &bpd(&quantised(QuantType::F16)));
    if std::env::var_os("TARFLOW_TEST_REPORT").is_some() {
        eprintln!("max |ΔBPD| per image: f16 {f16:.2e}, q8_0 {q8:.2e}, q4_0 {q4:.2e}");
    }
    // Measured (TARFLOW_TEST_REPORT=1): f16 8.9e-6, q8_0 9.6e-5, q4_0 2.4e-3 on the four
    // reference inputs; the bound is ~3× q8_0's. Precision orders the error.
    assert!(q8 < 3e-4, "q8_0 moved bits/dim by {q8}");
    assert!(
        q8 > 0.0,
        "q8_0 changed nothing: the weights were not quantised"
    );
    assert!(f16 < q8 && q8 < q4, "f16 {f16}, q8_0 {q8}, q4_0 {q4}");
}

#[test]
fn a_quantised_model_still_inverts() {
    let inp = load("tarflow-small/inputs.safetensors");
    let y = labels(&inp["labels"]);
    for t in [QuantType::Q8_0, QuantType::Q4_0] {
        let m = quantised(t);
        let z = m.forward(&inp["x"], Cond::Labels(&y)).unwrap().z;
        let back = m
            .reverse(&z, Cond::Labels(&y), &ReverseOptions::default())
            .unwrap();
        // f32's own round trip of these inputs is ~1e-5: the weights-only path keeps the map
        // continuous, so the quantised flow is exactly invertible up to float rounding.
        let what = format!("{t}: f⁻¹(f(x))");
        assert_abs_diff_eq!(
            common::values(&back).named(what),
            common::values(&inp["x"]),
            epsilon = 1e-3
        );
    }
}

#[test]
fn quantised_sampling_is_seeded_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.gguf");
    let ck = reference_checkpoint()
        .quantized(&recipe(QuantType::Q8_0))
        .unwrap();
    ck.save(&q).unwrap();
    let mut outs = Vec::new();
    for (i, seed) in ["3", "3", "4"].iter().enumerate() {
        let out = dir.path().join(format!("s{i}.png"));
        let o = tarflow(&[
            "sample",
            "--checkpoint",
            q.to_str().unwrap(),
            "--num",
            "4",
            "--labels",
            "1,2",
            "--seed",
            seed,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        outs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outs[0], outs[1], "the same seed gave different samples");
    assert_ne!(outs[0], outs[2], "another seed gave the same samples");
}

#[test]
fn the_gguf_file_round_trips_and_describes_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    let mem = reference_checkpoint()
        .quantized(&recipe(QuantType::Q4_0))
        .unwrap();
    mem.save(&path).unwrap();
    let back = Checkpoint::load(&path, &Device::Cpu).unwrap();
    let (a, b) = (mem.quant.as_ref().unwrap(), back.quant.as_ref().unwrap());
    assert_eq!(a.recipe, b.recipe);
    assert_eq!(a.plan, b.plan);
    assert_eq!(back.config, mem.config);
    // Rows of 48 (proj_in: patch_dim 3·4·4) do not fit q4_0's blocks of 32: kept f32, listed.
    let kept: Vec<&str> = b.kept_f32().map(|p| p.layer.as_str()).collect();
    assert_eq!(kept.len(), 4, "{kept:?}");
    assert!(kept.iter().all(|l| l.ends_with("proj_in")));
    let (ma, mb) = (
        mem.model(&Device::Cpu, DType::F32).unwrap(),
        back.model(&Device::Cpu, DType::F32).unwrap(),
    );
    assert_eq!(
        bpd(&ma),
        bpd(&mb),
        "the file scores differently from memory"
    );
    // Smaller than the f32 file by the recipe's ratio.
    let f32_path = dir.path().join("f32.safetensors");
    reference_checkpoint().save(&f32_path).unwrap();
    let (qs, fs) = (
        std::fs::metadata(&path).unwrap().len() as f64,
        std::fs::metadata(&f32_path).unwrap().len() as f64,
    );
    assert!(qs < 0.3 * fs, "{qs} vs {fs}");
    // info prints the recipe and the kept layers.
    let o = tarflow(&["info", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("recipe       q4_0, *.proj_out=f16"), "{out}");
    assert!(
        out.contains("blocks.0.proj_in [128, 48]: rows of 48"),
        "{out}"
    );
    // A quantised model is not trained further.
    let e = match back.trainable_model(&Device::Cpu, DType::F32) {
        Ok(_) => panic!("a quantised checkpoint gave a trainable model"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("cannot be trained"), "{e}");
}

#[test]
fn files_that_do_not_fit_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("q.gguf");
    reference_checkpoint()
        .quantized(&recipe(QuantType::Q8_0))
        .unwrap()
        .save(&good)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();

    // Truncated.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = Checkpoint::load(&cut, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.gguf") && e.contains("tensor"), "{e}");
    let cut_head = dir.path().join("head.gguf");
    std::fs::write(&cut_head, &bytes[..100]).unwrap();
    let e = Checkpoint::load(&cut_head, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head.gguf") && e.contains("GGUF"), "{e}");

    // Another model's config with these tensors.
    let mut f = std::io::Cursor::new(&bytes);
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        tensors.push((
            name.clone(),
            content.tensor(&mut f, name, &Device::Cpu).unwrap(),
        ));
    }
    let mut meta: Vec<(String, gguf_file::Value)> = content.metadata.into_iter().collect();
    let mut other = reference_checkpoint().config;
    other.channels = 64;
    for (k, v) in meta.iter_mut() {
        if k == "tarflow.config" {
            *v = gguf_file::Value::String(serde_json::to_string(&other).unwrap());
        }
    }
    let write = |path: &std::path::Path,
                 meta: &[(String, gguf_file::Value)],
                 t: &[(String, QTensor)]| {
        let m: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t: Vec<(&str, &QTensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &m, &t).unwrap();
    };
    let wrong = dir.path().join("wrong.gguf");
    write(&wrong, &meta, &tensors);
    let e = Checkpoint::load(&wrong, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("wrong.gguf")
            && e.contains("does not match the model")
            && e.contains("expected"),
        "{e}"
    );

    // A GGUF of something else (no tarflow metadata).
    let llm = dir.path().join("llm.gguf");
    let w = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    write(
        &llm,
        &[(
            "general.architecture".into(),
            gguf_file::Value::String("llama".into()),
        )],
        &[("token_embd.weight".into(), w)],
    );
    let e = Checkpoint::load(&llm, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("llm.gguf") && e.contains("tarflow quantize"),
        "{e}"
    );

    // A model where the images go.
    let o = tarflow(&["score", good.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pass it with --checkpoint"),
        "{}",
        text(&o)
    );
    // Through the CLI too: the path is named, no panic.
    let o = tarflow(&["score", "--checkpoint", cut.to_str().unwrap(), "x.png"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cut.gguf"),
        "{}",
        text(&o)
    );
}

#[test]
fn unknown_types_and_rules_that_match_nothing_are_errors() {
    let e = "q9_9".parse::<QuantType>().unwrap_err().to_string();
    assert!(
        e.contains("q9_9") && e.contains("q8_0") && e.contains("q4k"),
        "{e}"
    );
    assert_eq!("Q4_K".parse::<QuantType>().unwrap(), QuantType::Q4k);
    let e = "blocks.0.mlp".parse::<Rule>().unwrap_err().to_string();
    assert!(e.contains("PATTERN=TYPE"), "{e}");
    let r = Recipe {
        base: QuantType::Q8_0,
        rules: vec!["blocks.9.*=f32".parse().unwrap()],
    };
    let e = reference_checkpoint()
        .quantized(&r)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocks.9.*") && e.contains("matches no Linear layer"),
        "{e}"
    );
    let o = tarflow(&["quantize", "--to", "int3", "-o", "x.gguf"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("int3") && err.contains("q8_0"), "{}", text(&o));
    // Quantising a quantised file.
    let once = reference_checkpoint()
        .quantized(&recipe(QuantType::Q8_0))
        .unwrap();
    let e = once
        .quantized(&recipe(QuantType::Q4_0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already quantised"), "{e}");
}

#[test]
fn the_cli_quantises_measures_and_scores_the_shipped_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mnist-q8.gguf");
    let report = dir.path().join("report.json");
    let test = format!(
        "mnist-idx:{}",
        repo("data/mnist/t10k-images-idx3-ubyte.gz").display()
    );
    let o = tarflow(&[
        "quantize",
        "--to",
        "q8_0",
        "-o",
        out.to_str().unwrap(),
        "--eval",
        &test,
        "--limit",
        "64",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let delta = r["delta"]["delta"].as_f64().unwrap();
    // The shipped model at q8_0 with f16 heads: +0.0042 on 1000 test digits.
    assert!(delta.abs() < 0.02, "ΔBPD {delta}");
    assert!(r["inversion_error"].as_f64().unwrap() < 1e-3, "{r}");
    assert!(r["file_bytes"].as_f64().unwrap() < 0.3 * r["f32_file_bytes"].as_f64().unwrap());
    // Every command loads it.
    let sample = repo("data/mnist-samples");
    let o = tarflow(&[
        "score",
        "--checkpoint",
        out.to_str().unwrap(),
        sample.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("bits/dim"),
        "{}",
        text(&o)
    );
    // candle's integer matmul rounds the activations too: another (worse) likelihood.
    let native = tarflow(&[
        "--native-qmatmul",
        "score",
        "--checkpoint",
        out.to_str().unwrap(),
        sample.to_str().unwrap(),
    ]);
    assert!(native.status.success(), "{}", text(&native));
    let mean = |o: &std::process::Output| -> f64 {
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        let line = s
            .lines()
            .find(|l| l.contains("bits/dim mean"))
            .unwrap()
            .to_string();
        line.split("mean ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (w, n) = (mean(&o), mean(&native));
    assert!(
        n - w > 1e-3,
        "weights-only {w}, native {n}: the switch did nothing"
    );
    let o = tarflow(&[
        "bench",
        "score",
        "--checkpoint",
        out.to_str().unwrap(),
        "--iters",
        "1",
        "--batch",
        "8",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // The sensitivity study runs end to end on a few images.
    let o = tarflow(&[
        "quantize",
        "--to",
        "q4_0",
        "--eval",
        &test,
        "--limit",
        "16",
        "--sensitivity",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("| blocks.3 mlp |") && s.contains("recipe: q8_0, *.proj_out=f16"),
        "{s}"
    );
}
