//! IDX reading and the embedded default dataset, on files the tests write themselves.

use approx::abs_diff_eq;
use std::io::Write;
use tarflow_datasets::{embedded, idx};

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn raw_and_gzip_idx_files_give_exact_pixels_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..3 * 2 * 4).map(|i| (i * 7 % 256) as u8).collect();
    let img = idx_bytes(&[3, 2, 4], &pixels);
    let lab = idx_bytes(&[3], &[9, 0, 4]);
    for (name, wrap) in [("raw", false), ("gz", true)] {
        let ip = dir.path().join(format!("{name}-images"));
        let lp = dir.path().join(format!("{name}-labels"));
        std::fs::write(&ip, if wrap { gz(&img) } else { img.clone() }).unwrap();
        std::fs::write(&lp, if wrap { gz(&lab) } else { lab.clone() }).unwrap();
        let set = idx::read_mnist(&ip, Some(&lp)).unwrap();
        assert_eq!(
            (set.len(), set.channels, set.height, set.width),
            (3, 1, 2, 4)
        );
        assert_eq!(set.pixels, pixels);
        assert_eq!(set.image(1).unwrap(), &pixels[8..16]);
        assert_eq!(set.labels, Some(vec![9, 0, 4]));
        assert_eq!(set.num_classes(), 10);
        let unlabelled = idx::read_mnist(&ip, None).unwrap();
        assert_eq!(unlabelled.label(0), None);
    }
}

#[test]
fn corrupt_idx_files_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = idx_bytes(&[2, 2, 2], &[1; 8]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "too short"),
        ("magic", vec![1, 2, 3, 4, 5, 6, 7, 8], "bad IDX magic"),
        (
            "float",
            {
                let mut v = good.clone();
                v[2] = 0x0d;
                v
            },
            "only unsigned bytes",
        ),
        (
            "truncated",
            good[..good.len() - 3].to_vec(),
            "promises 8 bytes of data, file has 5",
        ),
        ("header", vec![0, 0, 8, 3, 0, 0], "truncated IDX header"),
        ("badgz", vec![0x1f, 0x8b, 8, 0, 1, 2, 3], "corrupt gzip"),
        ("rank", idx_bytes(&[8], &[0; 8]), "expected (N, H, W)"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = idx::read_mnist(&p, None).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
    let ip = dir.path().join("images");
    std::fs::write(&ip, &good).unwrap();
    let lp = dir.path().join("labels");
    std::fs::write(&lp, idx_bytes(&[3], &[0, 1, 2])).unwrap();
    let e = idx::read_mnist(&ip, Some(&lp)).unwrap_err().to_string();
    assert!(e.contains("labels") && e.contains("expected (2)"), "{e}");
    let e = idx::read_mnist(&dir.path().join("absent"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent"), "{e}");
}

#[test]
fn embedded_default_is_ten_thousand_real_mnist_digits() {
    let set = embedded::mnist10k().unwrap();
    assert_eq!(
        (set.len(), set.channels, set.height, set.width),
        (10_000, 1, 28, 28)
    );
    assert_eq!(set.num_classes(), 10);
    // SOURCE.md: item i has label i mod 10 at the start; mean pixel 33.44.
    assert_eq!(
        &set.labels.as_ref().unwrap()[..10],
        &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    );
    assert!(
        abs_diff_eq!(set.mean_pixel(), 33.44, epsilon = 0.01),
        "mean {}",
        set.mean_pixel()
    );
}
