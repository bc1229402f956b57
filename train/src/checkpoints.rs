//! The run directory: `config.toml`, `metrics.jsonl`, `plots/`, `samples/`,
//! `checkpoints/step-XXXXXXX/{model,ema,optimizer}.safetensors + state.json` and `latest`.
//!
//! A checkpoint is written into a hidden temporary folder, every file fsynced, the folder renamed
//! into place, and only then is `latest` switched (itself by temp file + rename): a crash at any
//! instant leaves the previous checkpoint loadable.

use crate::error::{Result, TrainError};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tarflow_flows::checkpoint::write_atomic;
use tarflow_flows::rundir::{RunLayout, EMA, MODEL};
use tarflow_flows::Checkpoint;

/// Where a run keeps its files: the layout of [`RunLayout`], plus writing checkpoints.
#[derive(Debug, Clone)]
pub struct RunDir {
    layout: RunLayout,
}

impl std::ops::Deref for RunDir {
    type Target = RunLayout;
    fn deref(&self) -> &RunLayout {
        &self.layout
    }
}

/// Progress counters saved beside the weights (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch the next batch belongs to.
    pub epoch: u64,
    /// Index of the next batch within that epoch.
    pub batch_in_epoch: usize,
    /// Training images seen.
    pub images_seen: u64,
    /// Wall-clock seconds spent training so far.
    pub elapsed_s: f64,
    /// The run's seed (data order, noise and initial weights all derive from it).
    pub seed: u64,
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Restored {
    /// The trained weights.
    pub model: Checkpoint,
    /// The averaged weights, when the run keeps an EMA.
    pub ema: Option<HashMap<String, Tensor>>,
    /// AdamW moments by `m.{name}` / `v.{name}`.
    pub optimizer: HashMap<String, Tensor>,
    /// AdamW's step counter.
    pub optimizer_step: u64,
    /// Counters.
    pub state: TrainState,
    /// The checkpoint folder.
    pub dir: PathBuf,
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| TrainError::io(p, e))
}

fn fsync_dir(p: &Path) {
    // Best effort: some file systems refuse to open directories for syncing.
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.sync_all();
    }
}

impl RunDir {
    /// The run directory at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            layout: RunLayout::new(root),
        }
    }

    /// Creates the folders; fails clearly when the location is not writable.
    pub fn create(&self) -> Result<()> {
        for sub in ["", "plots", "samples", "checkpoints"] {
            mkdir(&self.root.join(sub))?;
        }
        // Prove now, not after an hour of training, that files can be written here.
        write_atomic(&self.root.join(".write-test"), b"ok")?;
        let _ = std::fs::remove_file(self.root.join(".write-test"));
        Ok(())
    }

    /// Writes a checkpoint for `state.step` and points `latest` at it; keeps the newest `keep`
    /// checkpoints (0 keeps all). Returns its folder.
    pub fn save_checkpoint(
        &self,
        model: &Checkpoint,
        ema: Option<&Checkpoint>,
        optimizer: (&HashMap<String, Tensor>, u64),
        state: &TrainState,
        keep: usize,
    ) -> Result<PathBuf> {
        let name = format!("step-{:07}", state.step);
        let dir = self.checkpoints().join(&name);
        if dir.join("state.json").is_file() {
            // This step is already saved (an interrupt right after a periodic save): the
            // weights are the same, and deleting the folder to rewrite it would leave `latest`
            // pointing at nothing if we were killed in between.
            write_atomic(&self.latest_path(), name.as_bytes())?;
            return Ok(dir);
        }
        let tmp = self.checkpoints().join(format!(".tmp-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        mkdir(&tmp)?;
        model.save(tmp.join(MODEL))?;
        if let Some(e) = ema {
            e.save(tmp.join(EMA))?;
        }
        let (moments, opt_step) = optimizer;
        let mut sorted: Vec<(&String, Tensor)> = Vec::with_capacity(moments.len());
        for (k, v) in moments {
            sorted.push((k, v.contiguous()?));
        }
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let meta = HashMap::from([("step".to_string(), opt_step.to_string())]);
        let opt_path = tmp.join("optimizer.safetensors");
        let bytes =
            safetensors::tensor::serialize(sorted.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
                .map_err(|e| TrainError::Run {
                    path: opt_path.clone(),
                    msg: format!("cannot serialise the optimizer state: {e}"),
                })?;
        write_atomic(&opt_path, &bytes)?;
        let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Run {
            path: tmp.clone(),
            msg: e.to_string(),
        })?;
        write_atomic(&tmp.join("state.json"), &json)?;
        fsync_dir(&tmp);
        if dir.exists() {
            // A folder without state.json is an unfinished rename target; `latest` never
            // points at it.
            std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
        fsync_dir(&self.checkpoints());
        write_atomic(&self.latest_path(), name.as_bytes())?;
        self.remove_stale_temps()?;
        if keep > 0 {
            self.prune(keep, &dir)?;
        }
        Ok(dir)
    }

    /// Deletes all but the newest `keep` checkpoints (never `current`).
    fn prune(&self, keep: usize, current: &Path) -> Result<()> {
        let ck = self.checkpoints();
        let mut steps: Vec<PathBuf> = std::fs::read_dir(&ck)
            .map_err(|e| TrainError::io(&ck, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        steps.sort();
        let n = steps.len();
        for p in steps.into_iter().take(n.saturating_sub(keep)) {
            if p != current {
                std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// Removes the half-written checkpoints of a killed process: never pointed at, only
    /// taking space.
    fn remove_stale_temps(&self) -> Result<()> {
        let ck = self.checkpoints();
        for e in std::fs::read_dir(&ck)
            .map_err(|e| TrainError::io(&ck, e))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".tmp-step-") {
                let p = e.path();
                std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// Reads the checkpoint `latest` points to.
    pub fn load_latest(&self, device: &Device) -> Result<Restored> {
        let dir = self.latest()?.ok_or_else(|| TrainError::Run {
            path: self.root.clone(),
            msg: "no checkpoint yet (no `latest` file): nothing to resume".into(),
        })?;
        Self::load_checkpoint(&dir, device)
    }

    /// Reads one checkpoint folder.
    pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Restored> {
        let model = Checkpoint::load(dir.join(MODEL), device)?;
        let ema_path = dir.join(EMA);
        let ema = if ema_path.exists() {
            Some(Checkpoint::load(&ema_path, device)?.tensors)
        } else {
            None
        };
        let opt_path = dir.join("optimizer.safetensors");
        let bytes = std::fs::read(&opt_path).map_err(|e| TrainError::io(&opt_path, e))?;
        let bad = |msg: String| TrainError::Run {
            path: opt_path.clone(),
            msg,
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let optimizer_step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("no `step` in its metadata".into()))?;
        let optimizer = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(format!("unreadable tensors: {e}")))?;
        let sp = dir.join("state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| TrainError::io(&sp, e))?;
        let state: TrainState = serde_json::from_str(&text).map_err(|e| TrainError::Run {
            path: sp.clone(),
            msg: format!("bad state: {e}"),
        })?;
        Ok(Restored {
            model,
            ema,
            optimizer,
            optimizer_step,
            state,
            dir: dir.to_path_buf(),
        })
    }
}
