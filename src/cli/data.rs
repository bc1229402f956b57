//! `tarflow data inspect --source KIND [--path P] [--json] [--grid out.png]`.

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
    }
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
