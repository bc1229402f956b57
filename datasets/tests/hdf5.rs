//! HDF5 source (feature `hdf5`): the NCHW and NHWC fixtures hold the same 20 real images as
//! the npz fixtures (SOURCE-foolbox.md), and bad files are explained.
#![cfg(feature = "hdf5")]

use std::path::Path;
use tarflow_datasets::hdf5::{read_hdf5, Hdf5Options, Layout};
use tarflow_datasets::npz;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn both_layouts_match_the_npz_pixels_and_labels() {
    let mut want = npz::read_imagenet(&fixture("train_data_batch_1.npz")).unwrap();
    want.append(
        npz::read_imagenet(&fixture("val_data.npz")).unwrap(),
        Path::new("val"),
    )
    .unwrap();
    let nchw = read_hdf5(
        &fixture("imagenet64_nchw_fuel.h5"),
        &Hdf5Options {
            chunk: 7,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((nchw.len(), nchw.channels, nchw.height), (20, 3, 64));
    assert_eq!(nchw.pixels, want.pixels);
    assert_eq!(nchw.labels, None);
    let opts = Hdf5Options {
        images: Some("images".into()),
        labels: Some("labels".into()),
        layout: Some(Layout::Nhwc),
        chunk: 3,
    };
    let nhwc = read_hdf5(&fixture("imagenet64_nhwc_gzip.h5"), &opts).unwrap();
    assert_eq!(nhwc.pixels, want.pixels, "NHWC converted to planar");
    assert_eq!(
        nhwc.labels, want.labels,
        "0-based labels agree with the npz ones"
    );
    // Layout inference gives the same result.
    assert_eq!(
        read_hdf5(&fixture("imagenet64_nhwc_gzip.h5"), &Hdf5Options::default()).unwrap(),
        nhwc
    );
}

#[test]
fn bad_hdf5_files_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("flat.h5");
    let f = hdf5::File::create(&p).unwrap();
    f.new_dataset_builder()
        .with_data(&ndarray::Array2::<u8>::zeros((2, 3)))
        .create("images")
        .unwrap();
    f.new_dataset_builder()
        .with_data(&ndarray::Array1::<i64>::zeros(5))
        .create("labels")
        .unwrap();
    drop(f);
    let e = read_hdf5(&p, &Hdf5Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("flat.h5") && e.contains("expected 4 axes"),
        "{e}"
    );
    let e = read_hdf5(
        &p,
        &Hdf5Options {
            images: Some("pics".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no dataset `pics`"), "{e}");
    let e = read_hdf5(
        &fixture("imagenet64_nhwc_gzip.h5"),
        &Hdf5Options {
            labels: Some("nope".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("label dataset `nope`"), "{e}");
    let q = dir.path().join("text.h5");
    std::fs::write(&q, "not hdf5").unwrap();
    let e = read_hdf5(&q, &Hdf5Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("text.h5") && e.contains("not a readable HDF5"),
        "{e}"
    );
}

/// The error reading a committed fuzz regression input (`fuzz/regressions/hdf5/NAME`).
fn regression_error(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions/hdf5")
        .join(name);
    read_hdf5(&p, &Hdf5Options::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn a_file_that_crashes_libhdf5_is_an_error_not_a_crash() {
    // Found by `fuzz/run.sh hdf5`: Debian's libhdf5 1.10 segfaults in H5Lexists on it.
    let e = regression_error("segv-in-H5Lexists.h5");
    assert!(
        e.contains("segv-in-H5Lexists.h5") && e.contains("libhdf5 crashed"),
        "{e}"
    );
}

#[test]
fn a_billion_images_of_zero_pixels_is_refused_at_once() {
    // Found by `fuzz/run.sh hdf5` as a timeout: the read loop walked the claimed count.
    let e = regression_error("zero-pixel-images-claimed-by-the-billion.h5");
    assert!(e.contains("zero pixels"), "{e}");
}
