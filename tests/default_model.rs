//! The embedded default model through the binary: `score`/`sample` without `--checkpoint`,
//! dataset scoring with its identity, OOD detection and classification by likelihood.

mod common;

use approx::{abs_diff_eq, assert_abs_diff_eq};
use common::{tarflow, text};

fn repo(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// The `bits_per_dim` of each JSON line of `score --json`.
fn bits_per_dim_lines(o: &std::process::Output) -> Vec<f64> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["bits_per_dim"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn score_and_sample_work_without_a_checkpoint_and_name_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let grid = tempfile::tempdir().unwrap();
    // Draw digits from the default model, then score them and a real test digit.
    let o = tarflow(&[
        "sample",
        "--num",
        "4",
        "--labels",
        "0,1,2,3",
        "--out-dir",
        dir.path().to_str().unwrap(),
        "--out",
        grid.path().join("grid.png").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stderr(&o).contains("model: the default model tarflow-mnist-bpd"),
        "{}",
        text(&o)
    );
    let o = tarflow(&["score", dir.path().to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stderr(&o).contains("model: the default model"),
        "{}",
        text(&o)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let b = r["bits_per_dim"].as_f64().unwrap();
        // Below the 8 bits/dim of uniform noise (a temperature-1 sample written as 8-bit PNG
        // scores about 2–5 under this model).
        assert!(
            b > 0.0 && b < 8.0,
            "a sample of the model scores {b} bits/dim"
        );
    }
}

#[test]
fn a_dataset_source_scores_with_its_identity_and_standard_error() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("s.json");
    let run = |bound: &str, draws: &str| {
        let o = tarflow(&[
            "score",
            "--source",
            "mnist-idx",
            "--path",
            &repo("data/mnist/t10k-images-idx3-ubyte.gz"),
            "--limit",
            "40",
            "--draws",
            draws,
            "--bound",
            bound,
            "--summary",
            summary.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
        v
    };
    let elbo = run("elbo", "4");
    let iw = run("iw", "4");
    assert_eq!(elbo["data"]["count"], 40);
    let sha = elbo["data"]["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert_eq!(
        sha,
        iw["data"]["sha256"].as_str().unwrap(),
        "same data, same identity"
    );
    let (e, i) = (
        elbo["bits_per_dim"]["mean"].as_f64().unwrap(),
        iw["bits_per_dim"]["mean"].as_f64().unwrap(),
    );
    assert!(i <= e, "IW {i} above the ELBO average {e}");
    assert!(e > 0.5 && e < 3.0, "test digits at {e} bits/dim");
    let se = elbo["bits_per_dim"]["stderr"].as_f64().unwrap();
    let sd = elbo["bits_per_dim"]["std"].as_f64().unwrap();
    assert_abs_diff_eq!(se, sd / 40f64.sqrt(), epsilon = 1e-12);
    assert_eq!(elbo["excluded"], 0);
}

#[test]
fn ood_separates_digits_from_inverted_digits_and_noise() {
    let o = tarflow(&[
        "ood",
        "--in",
        &format!("mnist-idx:{}", repo("data/mnist/t10k-images-idx3-ubyte.gz")),
        "--train",
        &format!(
            "mnist-idx:{}",
            repo("data/mnist/train-images-idx3-ubyte.gz")
        ),
        "--ood",
        "inverted",
        "--ood",
        "noise",
        "--ood",
        &format!(
            "mnist-idx:{}",
            repo("data/fashion-mnist/t10k-images-idx3-ubyte.gz")
        ),
        "--limit",
        "40",
        "--typical-batch",
        "1,5",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in &rows[1..] {
        let a = r["auroc_bpd"].as_f64().unwrap();
        assert!(a > 0.9, "{}: AUROC {a}", r["set"]);
        assert!(r["auroc_typicality_m5"].as_f64().is_some(), "{r}");
        assert_eq!(
            r["count"].as_u64().unwrap() + r["excluded"].as_u64().unwrap(),
            40
        );
    }
    assert_eq!(v["in"]["count"], 40);
}

#[test]
fn classify_by_likelihood_beats_chance_and_draws_the_confusion_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("confusion.png");
    let o = tarflow(&[
        "classify",
        "--data",
        &format!("mnist-idx:{}", repo("data/mnist/t10k-images-idx3-ubyte.gz")),
        "--limit",
        "30",
        "--json",
        "--confusion",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "accuracy {acc} (chance 0.1)");
    let m = v["confusion"].as_array().unwrap();
    let total: u64 = m
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 30);
    let img = image::open(&png).unwrap();
    assert!(img.width() > 400 && img.height() > 400);
}

#[test]
fn a_folder_source_is_scored_like_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let samples = repo("data/mnist-samples");
    for e in std::fs::read_dir(&samples).unwrap().flatten().take(3) {
        if e.path().extension().is_some_and(|x| x == "png") {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    let summary = dir.path().join("s.json");
    let o = tarflow(&[
        "score",
        "--source",
        "folder",
        "--path",
        dir.path().to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let by_source: Vec<f64> = bits_per_dim_lines(&o);
    let o = tarflow(&["score", dir.path().to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let by_files: Vec<f64> = bits_per_dim_lines(&o);
    assert_eq!(by_source.len(), by_files.len());
    for (a, b) in by_source.iter().zip(&by_files) {
        assert!(abs_diff_eq!(a, b, epsilon = 1e-9), "{a} vs {b}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(v["data"]["count"].as_u64(), Some(by_files.len() as u64));
}
