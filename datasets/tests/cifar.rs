//! CIFAR-10 binary batches written by the test.

use tarflow_datasets::cifar;

fn record(label: u8, fill: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend((0..3072).map(|i| fill.wrapping_add((i / 1024) as u8)));
    r
}

#[test]
fn batches_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("data_batch_1.bin"),
        [record(3, 10), record(9, 20)].concat(),
    )
    .unwrap();
    std::fs::write(dir.path().join("data_batch_2.bin"), record(0, 200)).unwrap();
    std::fs::write(dir.path().join("readme.html"), b"ignored").unwrap();
    let set = cifar::read_cifar10(dir.path()).unwrap();
    assert_eq!(
        (set.len(), set.channels, set.height, set.width),
        (3, 3, 32, 32)
    );
    assert_eq!(set.labels.as_ref().unwrap(), &vec![3, 9, 0]);
    let img = set.image(1).unwrap();
    assert_eq!(
        (img[0], img[1024], img[2047], img[2048]),
        (20, 21, 21, 22),
        "planar R, G, B"
    );
    assert_eq!(set.image(2).unwrap()[3071], 202);
}

#[test]
fn bad_batches_name_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("trunc.bin");
    std::fs::write(&p, &record(1, 0)[..3000]).unwrap();
    let e = cifar::read_cifar10(&p).unwrap_err().to_string();
    assert!(e.contains("trunc.bin") && e.contains("3073-byte"), "{e}");
    let p = dir.path().join("label.bin");
    std::fs::write(&p, [record(1, 0), record(12, 0)].concat()).unwrap();
    let e = cifar::read_cifar10(&p).unwrap_err().to_string();
    assert!(
        e.contains("label.bin") && e.contains("record 1 has label 12"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(cifar::read_cifar10(empty.path())
        .unwrap_err()
        .to_string()
        .contains("no CIFAR-10"));
}
