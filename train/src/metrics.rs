//! `metrics.jsonl`: one JSON object per log step (training) or evaluation (validation).

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`; training lines carry the loss, evaluation lines `val_bpd`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Optimizer steps taken.
    pub step: u64,
    /// Fractional epoch (images seen / training images).
    pub epoch: f64,
    /// Mean training loss (per-dimension nats, ml-tarflow's) over the log window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The same loss as bits/dim of 8-bit data (noisy-input bound, not the validation figure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpd: Option<f64>,
    /// Learning rate of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Mean global gradient norm before clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Training throughput over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_s: Option<f64>,
    /// Mean seconds per step spent summing gradients across ranks (data-parallel runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
    /// Mean squared error of the learnable self-denoiser against its target over the window
    /// (models with `denoiser_layers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoiser_loss: Option<f64>,
    /// Wall-clock training seconds so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Held-out bits/dim (uniform dequantisation) of the trained weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_bpd: Option<f64>,
    /// Held-out bits/dim of the EMA weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_bpd_ema: Option<f64>,
    /// Held-out images left out of `val_bpd`/`val_bpd_ema` because their likelihood
    /// overflowed even in f64 (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_excluded: Option<usize>,
}

/// Appends records to a run's `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

/// Reads every record of a `metrics.jsonl`; a bad line is an error naming its number.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = read_text(path)?;
    Ok(parse(&text, path)?.into_iter().map(|(_, r)| r).collect())
}

/// The file's text; a file not written yet is empty.
fn read_text(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(TrainError::io(path, e)),
    }
}

/// Each record of `text` with the line it was read from. A crash can cut the last line short:
/// it is left out; any other bad line is an error naming its number.
fn parse<'a>(text: &'a str, path: &Path) -> Result<Vec<(&'a str, Record)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => out.push((line, r)),
            // A crash can cut the last line short; anything else is corruption.
            Err(_) if i + 1 == text.lines().count() => break,
            Err(e) => {
                return Err(TrainError::Run {
                    path: path.into(),
                    msg: format!("line {}: {e}", i + 1),
                })
            }
        }
    }
    Ok(out)
}

impl MetricsLog {
    /// Opens `path` for appending, first dropping records after `keep_until` (the steps a
    /// resumed run will redo) so the file never holds a step twice. The lines kept are kept as
    /// written (never re-serialised: a float's last digit would change), and a file with
    /// nothing to drop is not rewritten at all.
    pub fn open(path: &Path, keep_until: Option<u64>) -> Result<(Self, Vec<Record>)> {
        let text = read_text(path)?;
        let parsed = parse(&text, path)?;
        let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
        let whole = parsed.len() == lines && (text.is_empty() || text.ends_with('\n'));
        let (kept, dropped): (Vec<_>, Vec<_>) = parsed
            .into_iter()
            .partition(|(_, r)| keep_until.is_none_or(|s| r.step <= s));
        if !whole || !dropped.is_empty() || !path.exists() {
            let text: String = kept.iter().map(|(line, _)| format!("{line}\n")).collect();
            tarflow_flows::checkpoint::write_atomic(path, text.as_bytes())?;
        }
        let records = kept.into_iter().map(|(_, r)| r).collect();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok((
            Self {
                path: path.into(),
                file,
            },
            records,
        ))
    }

    fn line(path: &Path, r: &Record) -> Result<String> {
        let mut s = serde_json::to_string(r).map_err(|e| TrainError::Run {
            path: path.into(),
            msg: e.to_string(),
        })?;
        s.push('\n');
        Ok(s)
    }

    /// Appends one record.
    pub fn push(&mut self, r: &Record) -> Result<()> {
        let line = Self::line(&self.path, r)?;
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}
