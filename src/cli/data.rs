//! `tarflow data inspect --source KIND [--path P] [--json] [--grid out.png]` and
//! `tarflow data crops PHOTO... -o OUT.bin`.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tarflow_datasets::folder::FolderOptions;
use tarflow_datasets::source::{self, SourceKind};

/// Data subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print what a source holds and optionally write a grid of its first 64 images.
    Inspect(InspectArgs),
    /// Cut seeded 32×32 crops of photographs at several scales into a CIFAR-10 batch file
    /// (label = the photo's index), a colour set the `cifar10` source reads.
    Crops(CropsArgs),
}

/// Arguments of `tarflow data crops`.
#[derive(Debug, Args)]
pub struct CropsArgs {
    /// The photographs (1 to 10), in label order.
    #[arg(required = true)]
    photos: Vec<PathBuf>,
    /// Crops in all, taken from the photos in turn.
    #[arg(long, default_value_t = 6000)]
    count: usize,
    /// Downscaling factors a crop may be cut at (1 = full resolution).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    scales: Vec<u32>,
    /// Seed of positions, scales and flips.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output batch file (.bin).
    #[arg(short, long)]
    output: PathBuf,
}

/// Arguments of `tarflow data inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Source kind.
    #[arg(long, value_enum, default_value = "embedded")]
    source: SourceKind,
    /// File or folder of the source (not needed for `embedded`).
    #[arg(long)]
    path: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Folder source: output side S (shorter side resized to S, centre crop); default: the
    /// images' own size when they all agree.
    #[arg(long)]
    size: Option<usize>,
    /// Folder source: 1 (grayscale) or 3 (RGB) channels.
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Folder source: one class per top-level sub-folder (default: when every image is in one).
    #[arg(long, conflicts_with = "no_classes")]
    classes: bool,
    /// Folder source: no labels, even when the images are in sub-folders.
    #[arg(long)]
    no_classes: bool,
    /// Folder source: skip unreadable images (counted) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Write the first 64 images as an 8×8 PNG grid here.
    #[arg(long)]
    grid: Option<PathBuf>,
}

/// Runs a data subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Crops(a) => crops(a),
    }
}

fn crops(a: CropsArgs) -> Result<()> {
    let opts = tarflow_datasets::crops::CropOptions {
        size: 32,
        count: a.count,
        scales: a.scales.clone(),
        seed: a.seed,
    };
    let set = tarflow_datasets::crops::random_crops(&a.photos, &opts)?;
    let bytes = tarflow_datasets::cifar::to_records(&set, &a.output)?;
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    tarflow_flows::checkpoint::write_atomic(&a.output, &bytes)?;
    println!(
        "wrote {}: {} crops of 32×32 from {} photos (scales {:?}, seed {}), sha256 {}",
        a.output.display(),
        set.len(),
        a.photos.len(),
        a.scales,
        a.seed,
        &set.checksum()[..16]
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let kind = a.source;
    let folder = FolderOptions {
        size: a.size,
        channels: a.channels,
        class_per_subdir: match (a.classes, a.no_classes) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        skip_bad: a.skip_bad,
    };
    let loaded = source::load(kind, a.path.as_deref(), &folder)?;
    for n in &loaded.notes {
        eprintln!("note: {n}");
    }
    let (set, skipped) = (loaded.set, loaded.skipped);
    set.require_pixels(
        a.path
            .as_deref()
            .unwrap_or(std::path::Path::new("--source")),
    )?;
    if let Some((first, why)) = skipped.first() {
        eprintln!(
            "warning: skipped {} unreadable image(s); first: {} ({why})",
            skipped.len(),
            first.display()
        );
    }
    let labels = set.labels.as_deref().unwrap_or(&[]);
    let (lmin, lmax) = (labels.iter().min().copied(), labels.iter().max().copied());
    if a.json {
        let v = serde_json::json!({
            "count": set.len(), "channels": set.channels, "height": set.height, "width": set.width,
            "num_classes": set.num_classes(), "label_min": lmin, "label_max": lmax, "mean": set.mean_pixel(),
        });
        println!("{v}");
    } else {
        println!(
            "source       {} {}",
            a.source.name(),
            a.path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        println!(
            "images       {} of {}×{}×{}",
            set.len(),
            set.channels,
            set.height,
            set.width
        );
        match (lmin, lmax) {
            (Some(lo), Some(hi)) => println!(
                "labels       {} classes, range {lo}..={hi}",
                set.num_classes()
            ),
            _ => println!("labels       none"),
        }
        println!("mean pixel   {:.2} (0–255)", set.mean_pixel());
    }
    if let Some(out) = a.grid {
        let imgs: Vec<&[u8]> = (0..set.len().min(64))
            .filter_map(|i| set.image(i))
            .collect();
        tarflow_sample::grid::save(&imgs, set.channels, set.height, set.width, 8, &out)?;
        if !a.json {
            println!("grid         {}", out.display());
        }
    }
    Ok(())
}
