//! `tarflow sample` and `tarflow score` end to end on the reference fixture checkpoint.

mod common;

use approx::{abs_diff_eq, assert_abs_diff_eq, assert_abs_diff_ne};
use candle_core::{DType, Device, Tensor};
use common::{labels, load, reference_checkpoint, tarflow, text, values};
use std::path::{Path, PathBuf};
use std::process::Output;
use tarflow::flows::rng::{seeded, uniform};
use tarflow::Cond;

/// The imported reference checkpoint (3×16×16, patch 4, 10 classes) saved in `dir`.
fn checkpoint(dir: &Path) -> PathBuf {
    let p = dir.join("small.safetensors");
    reference_checkpoint().save(&p).unwrap();
    p
}

/// Writes `n` random 16×16 RGB PNGs; returns their paths and planar pixels.
fn pngs(dir: &Path, n: usize) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let mut paths = Vec::new();
    let mut planar = Vec::new();
    for i in 0..n {
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            let v = (x * 13 + y * 7 + i as u32 * 31) as u8;
            image::Rgb([v, v.wrapping_mul(3), 255 - v])
        });
        let p = dir.join(format!("img{i}.png"));
        img.save(&p).unwrap();
        let raw = img.into_raw();
        let mut pl = vec![0u8; 3 * 256];
        for (k, px) in raw.chunks(3).enumerate() {
            for c in 0..3 {
                pl[c * 256 + k] = px[c];
            }
        }
        paths.push(p);
        planar.push(pl);
    }
    (paths, planar)
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn score_equals_the_library_and_its_patches_sum_to_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path());
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let (paths, planar) = pngs(&imgs, 3);
    let model = reference_checkpoint()
        .model(&Device::Cpu, DType::F32)
        .unwrap();
    let flat: Vec<f32> = planar.iter().flatten().map(|&k| k as f32).collect();
    let k = Tensor::from_vec(flat, (3, 3, 16, 16), &Device::Cpu).unwrap();
    let p: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let heat = dir.path().join("heat.png");
    for (dequant, seed, label) in [("none", 0u64, None), ("uniform", 7, Some(4i64))] {
        let x = if dequant == "none" {
            ((&k / 127.5).unwrap() - 1.0).unwrap()
        } else {
            let u = uniform(&mut seeded(seed), (3, 3, 16, 16), 0.0, 1.0, &Device::Cpu).unwrap();
            (((&k + u).unwrap() / 128.0).unwrap() - 1.0).unwrap()
        };
        let lab = vec![label.unwrap_or(-1); 3];
        let cond = if label.is_some() {
            Cond::Labels(&lab)
        } else {
            Cond::Null
        };
        let want = model
            .nll(&model.forward(&x, cond).unwrap(), true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let seed_s = seed.to_string();
        let label_s = label.map(|l| l.to_string());
        let mut args = vec!["score", "--checkpoint", ck.to_str().unwrap(), "--json"];
        args.extend(["--dequant", dequant, "--seed", &seed_s]);
        if let Some(l) = &label_s {
            args.extend(["--label", l.as_str()]);
        }
        args.extend(["--heatmap", heat.to_str().unwrap()]);
        args.extend(&p);
        let o = tarflow(&args);
        assert!(o.status.success(), "{}", text(&o));
        let rows = json_lines(&o);
        assert_eq!(rows.len(), 3);
        for (r, w) in rows.iter().zip(&want) {
            let nll = r["nll_nats"].as_f64().unwrap();
            assert!(
                abs_diff_eq!(nll, *w as f64, epsilon = 1e-3 * w.abs() as f64),
                "{dequant}: {nll} vs {w}"
            );
            let bpd = r["bits_per_dim"].as_f64().unwrap();
            assert_abs_diff_eq!(bpd, nll / (768.0 * 2f64.ln()), epsilon = 1e-9);
            let bits: f64 = r["patch_bits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .sum();
            assert_eq!(r["patch_bits"].as_array().unwrap().len(), 16);
            assert!(
                abs_diff_eq!(bits, nll / 2f64.ln(), epsilon = 1e-6 * bits.abs()),
                "{bits} vs {nll}"
            );
            assert_eq!(r["block_logdet_nats"].as_array().unwrap().len(), 4);
        }
        let img = image::open(&heat).unwrap();
        assert!(
            img.width() > 500 && img.height() > 3 * 256,
            "{}×{}",
            img.width(),
            img.height()
        );
    }
    // A folder is scored too, with a summary line.
    let o = tarflow(&[
        "score",
        "--checkpoint",
        ck.to_str().unwrap(),
        imgs.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("images: bits/dim mean"), "{out}");
}

#[test]
fn score_rejects_bad_inputs_with_what_the_model_expects() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path());
    let ck = ck.to_str().unwrap();
    let big = dir.path().join("big.png");
    image::RgbImage::new(20, 24).save(&big).unwrap();
    let o = tarflow(&["score", "--checkpoint", ck, big.to_str().unwrap()]);
    let t = text(&o);
    assert!(
        !o.status.success()
            && t.contains("big.png")
            && t.contains("16×16")
            && t.contains("--resize"),
        "{t}"
    );
    let o = tarflow(&[
        "score",
        "--checkpoint",
        ck,
        "--resize",
        big.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let gray = dir.path().join("gray.png");
    image::GrayImage::new(16, 16).save(&gray).unwrap();
    let t = text(&tarflow(&[
        "score",
        "--checkpoint",
        ck,
        gray.to_str().unwrap(),
    ]));
    assert!(t.contains("gray.png") && t.contains("RGB"), "{t}");
    let bad = dir.path().join("corrupt.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let t = text(&tarflow(&[
        "score",
        "--checkpoint",
        ck,
        bad.to_str().unwrap(),
    ]));
    assert!(t.contains("corrupt.png") && t.contains("decode"), "{t}");
    let t = text(&tarflow(&["score", "--checkpoint", ck, "/no/such.png"]));
    assert!(t.contains("/no/such.png"), "{t}");
    let t = text(&tarflow(&[
        "score",
        "--checkpoint",
        big.to_str().unwrap(),
        gray.to_str().unwrap(),
    ]));
    assert!(t.contains("big.png") && t.contains("safetensors"), "{t}");
    let t = text(&tarflow(&[
        "score",
        "--checkpoint",
        ck,
        "--label",
        "12",
        gray.to_str().unwrap(),
        "--resize",
    ]));
    assert!(t.contains("--label 12") && t.contains("0..9"), "{t}");
}

#[test]
fn sample_with_reference_noise_reproduces_the_reference_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path());
    let (inp, exp) = (
        load("tarflow-small/inputs.safetensors"),
        load("tarflow-small/expected.safetensors"),
    );
    let z_path = dir.path().join("z.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("z".to_string(), inp["z_sample"].clone())]),
        &z_path,
    )
    .unwrap();
    let y: Vec<String> = labels(&inp["labels"])
        .iter()
        .map(|l| l.to_string())
        .collect();
    let y = y.join(",");
    let out = dir.path().join("out.safetensors");
    let grid = dir.path().join("grid.png");
    let singles = dir.path().join("singles");
    for (key, extra) in [
        ("reverse", vec![]),
        ("reverse_cfg2", vec!["--guidance", "2"]),
        (
            "reverse_cfg2_annealed",
            vec!["--guidance", "2", "--annealed"],
        ),
        (
            "reverse_cfg2_annealed_attntemp1p5",
            vec!["--guidance", "2", "--annealed", "--attn-temp", "1.5"],
        ),
    ] {
        let mut args = vec![
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--noise",
            z_path.to_str().unwrap(),
            "--labels",
            &y,
            "--out",
            grid.to_str().unwrap(),
            "--out-dir",
            singles.to_str().unwrap(),
            "--out-tensor",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = tarflow(&args);
        assert!(o.status.success(), "{}", text(&o));
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert_abs_diff_eq!(
            values(&got["samples"]).named(key),
            values(&exp[key]),
            epsilon = 1e-3
        );
    }
    assert!(image::open(&grid).is_ok());
    let one = image::open(singles.join("sample-00003.png")).unwrap();
    assert_eq!((one.width(), one.height()), (16, 16));
}

#[test]
fn sample_draws_seeded_images_and_rejects_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path());
    let ck = ck.to_str().unwrap();
    let run = |seed: &str, out: &Path| {
        let o = tarflow(&[
            "sample",
            "--checkpoint",
            ck,
            "--num",
            "6",
            "--batch",
            "4",
            "--seed",
            seed,
            "--labels",
            "random",
            "--temperature",
            "0.7",
            "--out",
            out.to_str().unwrap(),
            "--out-tensor",
            out.with_extension("safetensors").to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        candle_core::safetensors::load(out.with_extension("safetensors"), &Device::Cpu).unwrap()
    };
    let a = run("5", &dir.path().join("a.png"));
    let b = run("5", &dir.path().join("b.png"));
    let c = run("6", &dir.path().join("c.png"));
    assert_eq!(a["samples"].dims(), &[6, 3, 16, 16]);
    assert_eq!(values(&a["samples"]), values(&b["samples"]));
    assert_abs_diff_ne!(values(&a["samples"]), values(&c["samples"]), epsilon = 1e-3);
    let t = text(&tarflow(&["sample", "--checkpoint", ck, "--labels", "3,x"]));
    assert!(t.contains("--labels") && t.contains("\"x\""), "{t}");
    let t = text(&tarflow(&["sample", "--checkpoint", ck, "--labels", "10"]));
    assert!(t.contains("0..9"), "{t}");
    let t = text(&tarflow(&["sample", "--checkpoint", ck, "--denoise"]));
    assert!(t.contains("--sigma"), "{t}");
    let z = dir.path().join("z.safetensors");
    let bad = Tensor::zeros((2, 16, 47), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("z".to_string(), bad)]),
        &z,
    )
    .unwrap();
    let t = text(&tarflow(&[
        "sample",
        "--checkpoint",
        ck,
        "--noise",
        z.to_str().unwrap(),
    ]));
    assert!(
        t.contains("z.safetensors") && t.contains("(N, 16, 48)"),
        "{t}"
    );
}
