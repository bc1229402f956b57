//! Downsampled-ImageNet npz batches: real fixtures and small files written here.

use approx::abs_diff_eq;
use std::io::Write;
use std::path::Path;
use tarflow_datasets::npz;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(h.len() as u16).to_le_bytes());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(data);
    v
}

fn write_npz(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        z.start_file(format!("{name}.npy"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn real_batches_have_the_documented_layout_and_labels() {
    let train = npz::read_imagenet_batch(&fixture("train_data_batch_1.npz")).unwrap();
    assert_eq!(
        (train.len(), train.channels, train.height, train.width),
        (16, 3, 64, 64)
    );
    // SOURCE.md: map_clsloc ids 140, 309, 991, 332, … (1-based) → 0-based here.
    assert_eq!(&train.labels.as_ref().unwrap()[..4], &[139, 308, 990, 331]);
    // The batch's own `mean` array is the per-position mean of `data`.
    let mean = npz::read_npz_array(&fixture("train_data_batch_1.npz"), "mean")
        .unwrap()
        .unwrap();
    assert_eq!(mean.shape, vec![12288]);
    for pos in [0usize, 4096, 8191, 12287] {
        let m = f64::from_le_bytes(mean.data[pos * 8..pos * 8 + 8].try_into().unwrap());
        let ours = (0..16)
            .map(|i| train.image(i).unwrap()[pos] as f64)
            .sum::<f64>()
            / 16.0;
        assert!(
            abs_diff_eq!(m, ours, epsilon = 1e-9),
            "position {pos}: {m} vs {ours}"
        );
    }
    let val = npz::read_imagenet(&fixture("val_data.npz")).unwrap();
    assert_eq!(val.len(), 4);
    assert_eq!(val.labels.unwrap(), vec![40, 397, 636, 625]);
}

#[test]
fn written_batches_read_back_exactly_in_numeric_order() {
    let dir = tempfile::tempdir().unwrap();
    // Two 2×2 RGB images per batch: row = 4 red, 4 green, 4 blue bytes.
    for (k, label) in [(1u8, 1i64), (2, 7), (10, 1000)] {
        let data: Vec<u8> = (0..24).map(|i| i as u8 + 30 * k).collect();
        let labels: Vec<u8> = [label, label]
            .iter()
            .flat_map(|l| l.to_le_bytes())
            .collect();
        write_npz(
            &dir.path().join(format!("train_data_batch_{k}.npz")),
            &[
                ("data", npy("|u1", &[2, 12], &data)),
                ("labels", npy("<i8", &[2], &labels)),
            ],
        );
    }
    let set = npz::read_imagenet(dir.path()).unwrap();
    assert_eq!((set.len(), set.height), (6, 2));
    assert_eq!(set.labels.as_ref().unwrap(), &vec![0, 0, 6, 6, 999, 999]);
    // Batch 10 sorts after batch 2, and pixels stay channel-planar.
    assert_eq!(set.image(4).unwrap()[0], 300u16 as u8);
    assert_eq!(set.image(2).unwrap(), &(60..72).collect::<Vec<u8>>()[..]);
}

#[test]
fn malformed_batches_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let ok_data = npy("|u1", &[1, 12], &[0; 12]);
    // (file name, its members (name, .npy bytes), what the error must say)
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "nodata.npz",
            vec![("labels", npy("<i8", &[1], &1i64.to_le_bytes()))],
            "no array `data`",
        ),
        (
            "width.npz",
            vec![("data", npy("|u1", &[1, 13], &[0; 13]))],
            "width 13",
        ),
        (
            "label0.npz",
            vec![
                ("data", ok_data.clone()),
                ("labels", npy("<i8", &[1], &0i64.to_le_bytes())),
            ],
            "label 0 at index 0",
        ),
        (
            "count.npz",
            vec![
                ("data", ok_data.clone()),
                ("labels", npy("<i8", &[2], &[1u8; 16])),
            ],
            "2 labels for 1 images",
        ),
        (
            "short.npz",
            vec![("data", npy("|u1", &[2, 12], &[0; 12]))],
            "needs 24 bytes, found 12",
        ),
        (
            "float.npz",
            vec![("data", npy("<f4", &[1, 3], &[0; 12]))],
            "is <f4 of width 3",
        ),
        // f64 pixels or labels are refused on the host with their dtype named: nothing of a
        // dataset reaches a device but the loader's f32 batches (Metal has no f64).
        (
            "double.npz",
            vec![("data", npy("<f8", &[1, 3], &[0; 24]))],
            "is <f8 of width 3",
        ),
        (
            "double-labels.npz",
            vec![
                ("data", ok_data.clone()),
                ("labels", npy("<f8", &[1], &[0; 8])),
            ],
            "dtype <f8, expected integers",
        ),
    ];
    for (name, members, want) in cases {
        write_npz(&p(name), &members);
        let e = npz::read_imagenet_batch(&p(name)).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
    std::fs::write(p("garbage.npz"), b"not a zip").unwrap();
    let e = npz::read_imagenet_batch(&p("garbage.npz"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("garbage.npz") && e.contains("not an npz"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    assert!(npz::read_imagenet(empty.path())
        .unwrap_err()
        .to_string()
        .contains("no .npz batches"));
}
