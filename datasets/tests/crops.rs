//! Colour crops of the shipped photographs: seeded (the same options give the same bytes),
//! labelled by photo, each crop a flipped or unflipped window of the photo at one of its
//! scales, and written as CIFAR-10 records that read back unchanged.

use std::path::PathBuf;
use tarflow_datasets::cifar::{parse_cifar10, to_records};
use tarflow_datasets::crops::{random_crops, CropOptions};

fn photo(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/photos")
        .join(name)
}

fn opts(count: usize, scales: Vec<u32>, seed: u64) -> CropOptions {
    CropOptions {
        size: 32,
        count,
        scales,
        seed,
    }
}

#[test]
fn crops_are_seeded_labelled_windows_that_round_trip_as_cifar_records() {
    let photos = [photo("chelsea.png"), photo("rocket.jpg")];
    let a = random_crops(&photos, &opts(40, vec![1, 2, 4], 0)).unwrap();
    let b = random_crops(&photos, &opts(40, vec![1, 2, 4], 0)).unwrap();
    let c = random_crops(&photos, &opts(40, vec![1, 2, 4], 1)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.pixels, c.pixels);
    assert_eq!((a.len(), a.channels, a.height), (40, 3, 32));
    let labels = a.labels.clone().unwrap();
    assert_eq!(labels[..4], [0, 1, 0, 1]);
    // At full resolution only, every crop of the cat is a window of it, maybe mirrored.
    let full = random_crops(&photos[..1], &opts(5, vec![1], 3)).unwrap();
    let cat = image::open(&photos[0]).unwrap().to_rgb8();
    for img in full.images() {
        let px = |x: u32, y: u32| img[(y * 32 + x) as usize];
        let found = (0..=cat.width() - 32).any(|x0| {
            (0..=cat.height() - 32).any(|y0| {
                [false, true].iter().any(|&flip| {
                    (0..32).all(|y| {
                        (0..32).all(|x| {
                            let sx = if flip { 31 - x } else { x };
                            cat.get_pixel(x0 + sx, y0 + y)[0] == px(x, y)
                        })
                    })
                })
            })
        });
        assert!(found, "a crop is no window of the photo");
    }
    let bytes = to_records(&a, std::path::Path::new("x.bin")).unwrap();
    assert_eq!(bytes.len(), 40 * 3073);
    assert_eq!(
        parse_cifar10(&bytes, std::path::Path::new("x.bin")).unwrap(),
        a
    );
}

#[test]
fn crops_refuse_what_they_cannot_cut() {
    let eleven: Vec<PathBuf> = (0..11).map(|_| photo("chelsea.png")).collect();
    let e = random_crops(&eleven, &opts(4, vec![1], 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 to 10"), "{e}");
    let e = random_crops(&[photo("chelsea.png")], &opts(4, vec![16], 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("chelsea.png") && e.contains("smaller"), "{e}");
    let e = random_crops(&[photo("missing.png")], &opts(4, vec![1], 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.png"), "{e}");
}
