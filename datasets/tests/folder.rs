//! The image-folder source on folders the test writes: mixed sizes, grayscale, classes, bad files.

use std::path::Path;
use tarflow_datasets::folder::{read_folder, FolderOptions};

fn solid(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

fn opts(size: usize, channels: usize, classes: bool, skip_bad: bool) -> FolderOptions {
    FolderOptions {
        size,
        channels,
        class_per_subdir: classes,
        skip_bad,
    }
}

#[test]
fn mixed_sizes_grayscale_and_classes_read_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    solid(&r.join("cat/a.png"), 8, 8, [10, 20, 30]);
    // 16×8: shorter side 8 → no resize needed after scaling by 1; centre crop keeps the middle.
    let mut wide = image::RgbImage::from_pixel(16, 8, image::Rgb([0, 0, 0]));
    for y in 0..8 {
        for x in 4..12 {
            wide.put_pixel(x, y, image::Rgb([200, 100, 50]));
        }
    }
    std::fs::create_dir_all(r.join("dog")).unwrap();
    wide.save(r.join("dog/b.png")).unwrap();
    image::GrayImage::from_pixel(4, 4, image::Luma([77]))
        .save(r.join("dog/c.png"))
        .unwrap();
    solid(&r.join("val/x/ignored.png"), 8, 8, [1, 1, 1]);
    std::fs::write(r.join("dog/notes.txt"), "not an image").unwrap();

    let f = read_folder(r, &opts(8, 3, true, false)).unwrap();
    assert_eq!(f.classes, vec!["cat", "dog"], "val/ is not a class");
    let s = &f.set;
    assert_eq!((s.len(), s.channels, s.height, s.width), (3, 3, 8, 8));
    assert_eq!(s.labels.as_ref().unwrap(), &vec![0, 1, 1]);
    let a = s.image(0).unwrap();
    assert_eq!((a[0], a[64], a[128]), (10, 20, 30), "planar channels");
    assert!(
        s.image(1).unwrap()[..64].iter().all(|&v| v == 200),
        "centre crop of the wide image"
    );
    assert!(
        s.image(2).unwrap().iter().all(|&v| v == 77),
        "grayscale upscaled and replicated"
    );

    let g = read_folder(r, &opts(4, 1, false, false)).unwrap();
    assert_eq!(
        (g.set.len(), g.set.channels, g.set.labels.clone()),
        (3, 1, None)
    );
}

#[test]
fn bad_files_fail_with_path_and_index_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    solid(&r.join("a.png"), 4, 4, [1, 2, 3]);
    std::fs::write(r.join("b.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
    solid(&r.join("c.png"), 4, 4, [4, 5, 6]);
    let e = read_folder(r, &opts(4, 3, false, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("b.png") && e.contains("image 1") && e.contains("skip_bad"),
        "{e}"
    );
    let f = read_folder(r, &opts(4, 3, false, true)).unwrap();
    assert_eq!((f.set.len(), f.skipped.len()), (2, 1));
    assert!(f.skipped[0].0.ends_with("b.png"));

    let e = read_folder(r, &opts(4, 3, true, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside a class sub-folder"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = read_folder(empty.path(), &opts(4, 3, false, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no image files"), "{e}");
    assert!(read_folder(&r.join("missing"), &opts(4, 3, false, false)).is_err());
}
