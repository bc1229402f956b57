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
        size: Some(size),
        channels,
        class_per_subdir: Some(classes),
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

#[test]
fn size_and_classes_are_inferred_as_imagefolder_does() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for (i, class) in ["cat", "dog"].iter().enumerate() {
        for k in 0..2 + i {
            solid(&r.join(format!("{class}/{k}.png")), 16, 16, [k as u8, 0, 0]);
        }
    }
    let infer = FolderOptions {
        size: None,
        channels: 3,
        class_per_subdir: None,
        skip_bad: false,
    };
    let f = read_folder(r, &infer).unwrap();
    assert_eq!((f.set.len(), f.set.height, f.set.width), (5, 16, 16));
    assert_eq!(f.set.labels, Some(vec![0, 0, 1, 1, 1]));
    assert_eq!(f.classes, vec!["cat", "dog"]);
    assert!(
        f.notes.iter().any(|n| n.contains("2 classes")),
        "{:?}",
        f.notes
    );
    assert!(
        !f.notes.iter().any(|n| n.contains("resized")),
        "{:?}",
        f.notes
    );
    // Flags override: no labels, and an explicit size (said in a note).
    let f = read_folder(
        r,
        &FolderOptions {
            size: Some(8),
            class_per_subdir: Some(false),
            ..infer.clone()
        },
    )
    .unwrap();
    assert_eq!((f.set.height, f.set.labels.is_none()), (8, true));
    assert!(
        f.notes.iter().any(|n| n.contains("resized")),
        "{:?}",
        f.notes
    );
    // Sizes that differ: the least shorter side, said; an image outside a sub-folder: no labels.
    solid(&r.join("loose.png"), 20, 12, [1, 2, 3]);
    let f = read_folder(r, &infer).unwrap();
    assert_eq!((f.set.height, f.set.labels.is_none()), (12, true));
    assert!(
        f.notes.iter().any(|n| n.contains("2 sizes")),
        "{:?}",
        f.notes
    );
}
