//! Text conditioning of image files from the command line: `tarflow score IMAGES --text Y`
//! gives each image the likelihood under its own prompt, the library's number for the same
//! pixels and prompt, and another prompt gives another number.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_checkpoint, tarflow, text};
use tarflow::flows::cond::Text;
use tarflow::flows::config::ModelConfig;
use tarflow::Cond;

#[test]
fn score_of_image_files_takes_each_images_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        rope: true,
        txt_size: 2,
        txt_dim: 4,
        head_dim: 16,
        ..ModelConfig::new(1, 8, 2, 32, 2, 1, 0)
    };
    let ck = random_checkpoint(&cfg, 11);
    let ck_path = dir.path().join("text.safetensors");
    ck.save(&ck_path).unwrap();
    // Three 8×8 grey images and a prompt for each.
    let pixels: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            (0..64u8)
                .map(|p| p.wrapping_mul(3).wrapping_add(40 * i))
                .collect()
        })
        .collect();
    let mut paths = Vec::new();
    for (i, px) in pixels.iter().enumerate() {
        let p = dir.path().join(format!("img{i}.png"));
        image::GrayImage::from_raw(8, 8, px.clone())
            .unwrap()
            .save(&p)
            .unwrap();
        paths.push(p.to_str().unwrap().to_string());
    }
    let mut rng = tarflow::flows::rng::seeded(3);
    let y = tarflow::flows::rng::randn(&mut rng, (3, 2, 4), 1.0, &Device::Cpu).unwrap();
    let save = |name: &str, y: &Tensor| {
        let p = dir.path().join(name);
        candle_core::safetensors::save(&[("y", y.clone())].into_iter().collect(), &p).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (y1, y2) = (
        save("y1.safetensors", &y),
        save("y2.safetensors", &(&y * -10.0).unwrap()),
    );
    let score = |yp: &str| -> Vec<f64> {
        let mut args = vec![
            "score",
            "--checkpoint",
            ck_path.to_str().unwrap(),
            "--text",
            yp,
        ];
        args.extend(["--dequant", "none", "--json"]);
        args.extend(paths.iter().map(String::as_str));
        let o = tarflow(&args);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["nll_nats"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let got = score(&y1);
    // The library's discrete NLL of the same pixels under the same prompts.
    let m = ck.model(&Device::Cpu, DType::F32).unwrap();
    let x: Vec<f32> = pixels
        .iter()
        .flatten()
        .map(|&k| tarflow::datasets::transform::to_unit(k))
        .collect();
    let x = Tensor::from_vec(x, (3, 1, 8, 8), &Device::Cpu).unwrap();
    let out = m.forward(&x, Cond::Text(Text::new(&y, None))).unwrap();
    let want = m.nll(&out, true).unwrap().to_vec1::<f32>().unwrap();
    for (g, w) in got.iter().zip(&want) {
        approx::assert_abs_diff_eq!(*g, *w as f64, epsilon = 1e-3);
    }
    let other = score(&y2);
    assert!(
        got.iter().zip(&other).all(|(a, b)| (a - b).abs() > 1e-3),
        "{got:?} {other:?}"
    );
    // A folder given as --source reads the images in name order, each with its prompt.
    let folder = dir.path().join("imgs");
    std::fs::create_dir_all(&folder).unwrap();
    for p in &paths {
        let name = std::path::Path::new(p).file_name().unwrap();
        std::fs::copy(p, folder.join(name)).unwrap();
    }
    let o = tarflow(&[
        "score",
        "--checkpoint",
        ck_path.to_str().unwrap(),
        "--text",
        &y1,
        "--dequant",
        "none",
        "--json",
        "--source",
        "folder",
        "--path",
        folder.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let from_source: Vec<f64> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["nll_nats"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(from_source.len(), 3);
    for (g, w) in from_source.iter().zip(&got) {
        approx::assert_abs_diff_eq!(*g, *w, epsilon = 1e-6);
    }
    // Without --text the model says what it needs.
    let o = tarflow(&[
        "score",
        "--checkpoint",
        ck_path.to_str().unwrap(),
        &paths[0],
    ]);
    assert!(
        !o.status.success() && text(&o).contains("--text"),
        "{}",
        text(&o)
    );
}
