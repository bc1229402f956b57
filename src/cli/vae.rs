//! `tarflow vae encode --vae DIR (IMAGES… | --source KIND [--path P] | --tensors FILE) -o OUT`
//! and `tarflow vae decode --vae DIR --tensors FILE -o OUT(.safetensors|.png)`.

use super::runtime::RuntimeArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tarflow_datasets::folder::FolderOptions;
use tarflow_datasets::source::{self, SourceKind};
use tarflow_flows::autoencoder::Autoencoder;

/// Autoencoder subcommands.
#[derive(Debug, Subcommand)]
pub enum VaeCommand {
    /// Encode images to the posterior's mean and std (before the scaling factor).
    Encode(EncodeArgs),
    /// Decode latents `z` to images.
    Decode(DecodeArgs),
}

/// What both subcommands run: the autoencoder, its batch and its device.
#[derive(Debug, Args)]
pub struct VaeRun {
    /// The autoencoder: a diffusers folder (config.json, diffusion_pytorch_model.safetensors).
    #[arg(long)]
    vae: PathBuf,
    /// Images (or latents) per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

impl VaeRun {
    /// The autoencoder on the chosen device, and the device and dtype.
    fn load(&self) -> Result<(Autoencoder, Device, DType)> {
        let (device, dtype) = self.runtime.select()?;
        Ok((Autoencoder::load(&self.vae, &device, dtype)?, device, dtype))
    }
}

/// Arguments of `tarflow vae encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    run: VaeRun,
    /// Image files, resized (shorter side) and centre-cropped to --size.
    #[arg(conflicts_with_all = ["source", "tensors"])]
    images: Vec<PathBuf>,
    /// A dataset instead of files (the kinds of `data inspect`).
    #[arg(long, value_enum, conflicts_with = "tensors")]
    source: Option<SourceKind>,
    /// File or folder of --source.
    #[arg(long, requires = "source")]
    path: Option<PathBuf>,
    /// At most this many images of --source.
    #[arg(long)]
    limit: Option<usize>,
    /// Raw images: tensor `x` (N, C, S, S) in [−1, 1], in a safetensors file.
    #[arg(long)]
    tensors: Option<PathBuf>,
    /// Side in pixels that image files are resized (shorter side) and centre-cropped to.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Output (.safetensors): `mean`, `std`, and `labels` when the source has them.
    #[arg(short, long)]
    output: PathBuf,
}

/// Arguments of `tarflow vae decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    run: VaeRun,
    /// Latents: tensor `z` (N, latent, s, s), before the scaling factor.
    #[arg(long)]
    tensors: PathBuf,
    /// Output: `.safetensors` (tensor `x`) or `.png` (a grid).
    #[arg(short, long)]
    output: PathBuf,
}

/// Runs an autoencoder subcommand.
pub fn run(cmd: VaeCommand) -> Result<()> {
    match cmd {
        VaeCommand::Encode(a) => encode(a),
        VaeCommand::Decode(a) => decode(a),
    }
}

/// Tensor `name` of the safetensors file `path`, read on the host, in f32.
fn read_named(path: &Path, name: &str, what: &str) -> Result<Tensor> {
    use tarflow_sample::safetensors_file::{named, read_file};
    let map = read_file(path)?;
    Ok(named(&map, name, path, what)?.to_dtype(DType::F32)?)
}

/// `f` over `x` in batches of `batch` rows on `device`, results back on the host in f32.
fn batched(
    x: &Tensor,
    batch: usize,
    device: &Device,
    dtype: DType,
    f: impl Fn(&Tensor) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let n = x.dim(0)?;
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..n).step_by(batch.max(1)) {
        let b = x.narrow(0, i, batch.max(1).min(n - i))?;
        let outs = f(&tarflow_flows::device::upload(&b, device, dtype)?)?;
        for (k, o) in outs.into_iter().enumerate() {
            if parts.len() <= k {
                parts.push(Vec::new());
            }
            parts[k].push(tarflow_flows::device::to_host(&o)?.to_dtype(DType::F32)?);
        }
    }
    parts.iter().map(|p| Ok(Tensor::cat(p, 0)?)).collect()
}

fn encode(a: EncodeArgs) -> Result<()> {
    let (vae, device, dtype) = a.run.load()?;
    let c = vae.config.in_channels;
    // The images, their labels and what identifies them.
    let (x, labels, identity) = if let Some(t) = &a.tensors {
        let x = read_named(t, "x", "(N, C, S, S) images in [−1, 1]")?;
        match x.dims() {
            [_, ch, h, w] if *ch == c && h == w => {}
            d => bail!(
                "{}: tensor `x` has shape {d:?}, expected (N, {c}, S, S) for this autoencoder",
                t.display()
            ),
        }
        (x, None, format!("tensors {}", t.display()))
    } else {
        let set = if let Some(kind) = a.source {
            let opts = FolderOptions {
                channels: c,
                ..Default::default()
            };
            let loaded = source::load(kind, a.path.as_deref(), &opts)?;
            for n in &loaded.notes {
                eprintln!("note: {n}");
            }
            let mut set = loaded.set;
            set.require_pixels(a.path.as_deref().unwrap_or(Path::new("--source")))?;
            if let Some(l) = a.limit {
                set = set.subset(&(0..l.min(set.len())).collect::<Vec<_>>());
            }
            set
        } else if !a.images.is_empty() {
            let mut pixels = Vec::new();
            for p in &a.images {
                let img = tarflow_datasets::folder::load_image(p, a.size, c)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                pixels.extend_from_slice(&img);
            }
            tarflow_datasets::ImageSet {
                channels: c,
                height: a.size,
                width: a.size,
                pixels,
                labels: None,
                latents: None,
            }
        } else {
            bail!("nothing to encode: give image files, --source KIND [--path P] or --tensors X.safetensors");
        };
        if set.channels != c {
            bail!(
                "the images have {} channels; the autoencoder {} takes {c}",
                set.channels,
                a.run.vae.display()
            );
        }
        let id = format!("{} images, sha256 {}", set.len(), set.checksum());
        let v: Vec<f32> = set
            .pixels
            .iter()
            .map(|&k| tarflow_datasets::transform::to_unit(k))
            .collect();
        let x = Tensor::from_vec(v, (set.len(), c, set.height, set.width), &Device::Cpu)?;
        let labels = set.labels.clone();
        (x, labels, id)
    };
    let f = vae.config.downsample();
    if x.dim(2)? % f != 0 {
        bail!(
            "images of side {} do not divide by the autoencoder's downsampling {f}",
            x.dim(2)?
        );
    }
    let out = batched(&x, a.run.batch, &device, dtype, |b| {
        let (m, s) = vae.encode(b)?;
        Ok(vec![m, s])
    })?;
    let mut tensors = vec![
        ("mean".to_string(), out[0].clone()),
        ("std".to_string(), out[1].clone()),
    ];
    if let Some(l) = labels {
        let n = l.len();
        tensors.push(("labels".into(), Tensor::from_vec(l, n, &Device::Cpu)?));
    }
    // A whole source is recorded, so that its pixels (and their held-out split, the same
    // as the latents') can be found again for FD.
    let whole_source = a.source.filter(|_| a.limit.is_none()).map(|k| {
        let path = a.path.as_ref().map(|p| p.display().to_string());
        (k.name().to_string(), path)
    });
    let mut meta: HashMap<String, String> = [
        ("format", tarflow_datasets::latents::FORMAT.to_string()),
        ("count", x.dim(0)?.to_string()),
        ("data", identity),
        ("vae", vae.dir.display().to_string()),
        ("vae_sha256", vae.checksum.clone()),
        ("scaling_factor", vae.config.scaling_factor.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some((kind, path)) = whole_source {
        meta.insert("source".into(), kind);
        if let Some(p) = path {
            meta.insert("source_path".into(), p);
        }
    }
    write(&a.output, &tensors, meta)?;
    let d = out[0].dims();
    println!(
        "wrote {}: {} latents of {}×{}×{} (mean, std; before the scaling factor {})",
        a.output.display(),
        d[0],
        d[1],
        d[2],
        d[3],
        vae.config.scaling_factor
    );
    Ok(())
}

fn decode(a: DecodeArgs) -> Result<()> {
    let (vae, device, dtype) = a.run.load()?;
    let z = read_named(
        &a.tensors,
        "z",
        "(N, latent, s, s) latents before the scaling factor",
    )?;
    let l = vae.config.latent_channels;
    match z.dims() {
        [_, ch, h, w] if *ch == l && h == w => {}
        d => bail!(
            "{}: tensor `z` has shape {d:?}, expected (N, {l}, s, s) for this autoencoder",
            a.tensors.display()
        ),
    }
    let x = decode_latents(&vae, &z, a.run.batch, &device, dtype)?;
    let png = a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if png {
        let (n, c, h, w) = x.dims4()?;
        let bytes = tarflow_sample::grid::to_u8(&x)?;
        let imgs: Vec<&[u8]> = bytes.chunks_exact(c * h * w).collect();
        let cols = (n as f64).sqrt().ceil() as usize;
        tarflow_sample::grid::save(&imgs, c, h, w, cols.max(1), &a.output)?;
    } else {
        let tensors = vec![("x".to_string(), x.clone())];
        let meta: HashMap<String, String> =
            [("vae_sha256".to_string(), vae.checksum.clone())].into();
        write(&a.output, &tensors, meta)?;
    }
    println!("wrote {}: {} images", a.output.display(), x.dim(0)?);
    Ok(())
}

/// Latents `z` (on the host) decoded by `vae` in batches, back on the host in f32.
pub(super) fn decode_latents(
    vae: &Autoencoder,
    z: &Tensor,
    batch: usize,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    Ok(batched(z, batch, device, dtype, |b| Ok(vec![vae.decode(b)?]))?.remove(0))
}

/// Writes `tensors` with `meta` as a safetensors file, atomically.
fn write(path: &Path, tensors: &[(String, Tensor)], meta: HashMap<String, String>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .with_context(|| format!("serialising {}", path.display()))?;
    tarflow_flows::checkpoint::write_atomic(path, &bytes)?;
    Ok(())
}
