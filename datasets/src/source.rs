//! Source kinds as named in configs and on the command line.

use crate::error::{DataError, Result};
use crate::ImageSet;
use std::path::{Path, PathBuf};

/// Where images come from: the names the command line (`--source`) and configs
/// (`data.source`) take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SourceKind {
    /// Downsampled ImageNet npz batches (`imagenet-npz`).
    ImagenetNpz,
    /// HDF5 file (`hdf5`).
    Hdf5,
    /// Folder of image files (`folder`).
    Folder,
    /// MNIST / Fashion-MNIST IDX files (`mnist-idx`).
    MnistIdx,
    /// CIFAR-10 binary batches (`cifar10`).
    Cifar10,
    /// The embedded MNIST-10k default (`embedded`).
    #[default]
    Embedded,
    /// An autoencoder's latents, as `tarflow vae encode` writes them (`latents`).
    Latents,
}

/// Every accepted name, for error messages.
pub const KIND_NAMES: &str = "imagenet-npz, hdf5, folder, mnist-idx, cifar10, embedded, latents";

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "imagenet-npz" => SourceKind::ImagenetNpz,
            "hdf5" => SourceKind::Hdf5,
            "folder" => SourceKind::Folder,
            "mnist-idx" => SourceKind::MnistIdx,
            "cifar10" => SourceKind::Cifar10,
            "embedded" => SourceKind::Embedded,
            "latents" => SourceKind::Latents,
            other => {
                return Err(format!(
                    "unknown source kind {other:?}: expected one of {KIND_NAMES}"
                ))
            }
        })
    }
}

/// Finds the image and label IDX files of an MNIST-style folder, or pairs a given image file
/// with its `labels-idx1` sibling when there is one.
fn mnist_files(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let pick = |dir: &Path, needle: &str| -> Result<Option<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| DataError::Io {
                path: dir.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(needle))
            })
            .collect();
        v.sort();
        // Prefer the training split when a folder holds both (train-… sorts after t10k-…).
        Ok(v.iter()
            .find(|p| p.to_string_lossy().contains("train"))
            .cloned()
            .or(v.first().cloned()))
    };
    if path.is_dir() {
        let images = pick(path, "images-idx3")?.ok_or_else(|| {
            DataError::format(path, "no `*images-idx3-ubyte[.gz]` file in this folder")
        })?;
        let prefix = images
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label_name = prefix.replace("images-idx3", "labels-idx1");
        let labels = path.join(label_name);
        return Ok((images, labels.exists().then_some(labels)));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let labels = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
    Ok((
        path.to_path_buf(),
        (labels != path && labels.exists()).then_some(labels),
    ))
}

/// Unreadable files skipped while loading (only with `skip_bad`): path and reason.
pub type Skipped = Vec<(PathBuf, String)>;

/// A source read into memory, with what the caller should tell the user.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The images.
    pub set: ImageSet,
    /// Files skipped as unreadable (only with `skip_bad`).
    pub skipped: Skipped,
    /// What was inferred or changed on the way (a folder's size and classes).
    pub notes: Vec<String>,
}

impl SourceKind {
    /// The name configs and the command line use (`mnist-idx`).
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::ImagenetNpz => "imagenet-npz",
            SourceKind::Hdf5 => "hdf5",
            SourceKind::Folder => "folder",
            SourceKind::MnistIdx => "mnist-idx",
            SourceKind::Cifar10 => "cifar10",
            SourceKind::Embedded => "embedded",
            SourceKind::Latents => "latents",
        }
    }

    /// What a path of this kind must hold, and where such data comes from.
    pub fn layout(self) -> &'static str {
        match self {
            SourceKind::Embedded => "nothing: the embedded digits need no path",
            SourceKind::ImagenetNpz => {
                "the official downsampled ImageNet batches (train_data_batch_1.npz … \
                 train_data_batch_10.npz, or val_data.npz) in a folder, or one such file; they \
                 are the \"Downsampled ImageNet 64x64\" download of image-net.org (free \
                 account). A folder of PNG/JPEG images works too with data.source = \"folder\""
            }
            SourceKind::Cifar10 => {
                "the CIFAR-10 binary batches (data_batch_1.bin … data_batch_5.bin, test_batch.bin) \
                 in a folder, or one such file: cifar-10-binary.tar.gz from \
                 www.cs.toronto.edu/~kriz/cifar.html, unpacked"
            }
            SourceKind::MnistIdx => {
                "MNIST-style IDX files (train-images-idx3-ubyte[.gz] and its labels-idx1 sibling) \
                 in a folder, or the images file itself; this repository ships MNIST in data/mnist/"
            }
            SourceKind::Folder => {
                "a folder of png/jpeg/bmp/webp/gif images, one sub-folder per class for labels"
            }
            SourceKind::Latents => {
                "a `tarflow vae encode` output (.safetensors with `mean`, `std` and the \
                 autoencoder's identity), e.g. `tarflow vae encode --vae models/ae-mnist/vae \
                 --source embedded -o PATH`"
            }
            SourceKind::Hdf5 => {
                "an HDF5 file with an `images` (or image_data, data, x) dataset, NCHW or NHWC, \
                 and optional `labels`"
            }
        }
    }
}

/// Loads a whole source into memory; `folder` reads with `folder_opts`. A path that does not
/// exist is an error saying what the kind expects there and where such data comes from.
pub fn load(
    kind: SourceKind,
    path: Option<&Path>,
    folder_opts: &crate::folder::FolderOptions,
) -> Result<Loaded> {
    let need =
        || path.ok_or_else(|| DataError::format("<command line>", "this source kind needs a path"));
    if let Some(p) = path.filter(|p| !p.exists() && kind != SourceKind::Embedded) {
        return Err(DataError::format(
            p,
            format!("no such file or folder; expected {}", kind.layout()),
        ));
    }
    let set = match kind {
        SourceKind::Embedded => crate::embedded::mnist10k()?,
        SourceKind::ImagenetNpz => crate::npz::read_imagenet(need()?)?,
        SourceKind::Cifar10 => crate::cifar::read_cifar10(need()?)?,
        SourceKind::Latents => crate::latents::read_latents(need()?)?,
        SourceKind::MnistIdx => {
            let (images, labels) = mnist_files(need()?)?;
            crate::idx::read_mnist(&images, labels.as_deref())?
        }
        SourceKind::Folder => {
            let f = crate::folder::read_folder(need()?, folder_opts)?;
            return Ok(Loaded {
                set: f.set,
                skipped: f.skipped,
                notes: f.notes,
            });
        }
        #[cfg(feature = "hdf5")]
        SourceKind::Hdf5 => crate::hdf5::read_hdf5(need()?, &Default::default())?,
        #[cfg(not(feature = "hdf5"))]
        SourceKind::Hdf5 => return Err(DataError::format(
            path.unwrap_or(Path::new("<none>")),
            "this build has no HDF5 support: rebuild with `--features hdf5` (needs libhdf5-dev)",
        )),
    };
    Ok(Loaded {
        set,
        skipped: Vec::new(),
        notes: Vec::new(),
    })
}
