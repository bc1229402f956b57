//! Loader determinism, resume, split, and transform statistics.

use approx::abs_diff_eq;
use std::sync::Arc;
use tarflow_datasets::loader::{Batch, Loader};
use tarflow_datasets::transform::{Noise, Transform};
use tarflow_datasets::ImageSet;

/// n 1×2×4 images whose left half is dark and right half bright, labelled i % 5.
fn set(n: usize) -> Arc<ImageSet> {
    let img = [0u8, 0, 255, 255, 0, 0, 255, 255];
    Arc::new(ImageSet {
        channels: 1,
        height: 2,
        width: 4,
        pixels: img.repeat(n),
        labels: Some((0..n as i64).map(|i| i % 5).collect()),
        latents: None,
    })
}

fn collect(l: &Loader, epoch: u64, start: usize, workers: usize) -> Vec<Batch> {
    l.epoch_from(epoch, start, workers).iter().collect()
}

#[test]
fn shuffle_is_deterministic_per_seed_and_epoch_and_resumable() {
    let t = Transform {
        flip: true,
        noise: Noise::Gaussian(0.1),
        label_drop: 0.2,
    };
    let l = Loader::new(set(103), None, 10, 7, t, true);
    assert_eq!(l.batches_per_epoch(), 10, "drop-last");
    assert_eq!(
        l.epoch_order(3),
        Loader::new(set(103), None, 10, 7, t, true).epoch_order(3)
    );
    assert_ne!(l.epoch_order(3), l.epoch_order(4));
    assert_ne!(
        l.epoch_order(3),
        Loader::new(set(103), None, 10, 8, t, true).epoch_order(3)
    );
    let mut sorted = l.epoch_order(0);
    sorted.sort();
    assert_eq!(sorted, (0..103).collect::<Vec<_>>());
    // Same batches whatever the worker count, and resuming at batch 6 continues exactly.
    let full = collect(&l, 2, 0, 1);
    assert_eq!(full.len(), 10);
    assert_eq!(full, collect(&l, 2, 0, 3));
    assert_eq!(&full[6..], &collect(&l, 2, 6, 2)[..]);
    assert!(full
        .iter()
        .enumerate()
        .all(|(i, b)| b.index == i && b.epoch == 2 && b.shape == [10, 1, 2, 4]));
}

#[test]
fn split_is_disjoint_and_validation_is_unaugmented() {
    let t = Transform {
        flip: true,
        noise: Noise::None,
        label_drop: 1.0,
    };
    let (train, val) = Loader::split(set(50), 10, 5, 1, t);
    assert_eq!((train.len(), val.len()), (40, 10));
    let mut all = train.epoch_order(0);
    all.extend(val.epoch_order(0));
    all.sort();
    assert_eq!(all, (0..50).collect::<Vec<_>>());
    assert_eq!(
        val.epoch_order(0),
        val.epoch_order(1),
        "validation is not shuffled"
    );
    for b in collect(&val, 0, 0, 1) {
        assert!(
            b.labels.iter().all(|&l| l >= 0),
            "no label drop in validation"
        );
        assert!(
            b.images.chunks(8).all(|im| im[0] == -1.0 && im[3] == 1.0),
            "no flip in validation"
        );
    }
}

#[test]
fn flip_noise_and_label_drop_have_the_right_statistics() {
    let n = 4000;
    let t = Transform {
        flip: true,
        noise: Noise::None,
        label_drop: 0.1,
    };
    let b = Loader::new(set(n), None, n, 3, t, true).make_batch(&(0..n).collect::<Vec<_>>(), 0, 0);
    let flipped = b.images.chunks(8).filter(|im| im[0] == 1.0).count() as f64 / n as f64;
    assert!(
        abs_diff_eq!(flipped, 0.5, epsilon = 0.03),
        "flip rate {flipped}"
    );
    assert!(
        b.images
            .chunks(8)
            .all(|im| (im[0] == 1.0) == (im[3] == -1.0)),
        "whole rows flip"
    );
    let dropped = b.labels.iter().filter(|&&l| l == -1).count() as f64 / n as f64;
    assert!(
        abs_diff_eq!(dropped, 0.1, epsilon = 0.02),
        "drop rate {dropped}"
    );

    let sigma = 0.05;
    let t = Transform {
        flip: false,
        noise: Noise::Gaussian(sigma),
        label_drop: 0.0,
    };
    let b = Loader::new(set(n), None, n, 3, t, false).make_batch(&(0..n).collect::<Vec<_>>(), 0, 0);
    let clean = [-1.0f64, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0];
    let res: Vec<f64> = b
        .images
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 - clean[i % 8])
        .collect();
    let mean = res.iter().sum::<f64>() / res.len() as f64;
    let std = (res.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / res.len() as f64).sqrt();
    assert!(
        mean.abs() < 0.002 && (std - sigma).abs() < 0.002,
        "mean {mean}, std {std}"
    );

    let t = Transform {
        flip: false,
        noise: Noise::Uniform,
        label_drop: 0.0,
    };
    let b = Loader::new(set(n), None, n, 3, t, false).make_batch(&(0..n).collect::<Vec<_>>(), 0, 0);
    // Pixel 0 → [−1, −1 + 1/128); pixel 255 → [255/128 − 1, 1).
    for (i, &v) in b.images.iter().enumerate() {
        let (lo, hi) = if clean[i % 8] < 0.0 {
            (-1.0, -1.0 + 1.0 / 128.0)
        } else {
            (255.0 / 128.0 - 1.0, 1.0)
        };
        assert!(
            v as f64 >= lo && (v as f64) < hi,
            "{v} outside [{lo}, {hi})"
        );
    }
    let mean_u = b
        .images
        .iter()
        .step_by(8)
        .map(|&v| (v as f64 + 1.0) * 128.0)
        .sum::<f64>()
        / n as f64;
    assert!(
        abs_diff_eq!(mean_u, 0.5, epsilon = 0.02),
        "dequantisation noise mean {mean_u}"
    );
}
