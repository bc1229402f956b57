//! An experiment's results: one row per (variant, seed, sampling setting), written as
//! results.md, results.csv and plots.

use serde::{Deserialize, Serialize};
use std::path::Path;
use tarflow_train::metrics::read;
use tarflow_train::Result;

/// One row of the results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Variant name.
    pub variant: String,
    /// Training seed.
    pub seed: u64,
    /// Sampling setting name.
    pub sampling: String,
    /// Learned scalars.
    pub params: usize,
    /// Final validation bits/dim (EMA weights when kept, else trained).
    pub val_bpd: Option<f64>,
    /// Fréchet distance in classifier features.
    pub fd: f64,
    /// Training seconds.
    pub train_s: f64,
    /// Sampling seconds per image.
    pub sample_s_per_image: f64,
    /// Generated images that stayed NaN/Inf.
    #[serde(default)]
    pub non_finite: usize,
    /// The sample grid, relative to the results folder.
    pub grid: String,
}

/// The training loss of a run by step, from its metrics (empty when unreadable).
pub fn loss_curve(run_dir: &Path) -> Vec<(f64, f64)> {
    read(&run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.loss.map(|l| (r.step as f64, l)))
        .collect()
}

/// Writes results.md (`intro`, then the table), results.csv and the plots into `dir`.
pub fn write_results(
    intro: &str,
    rows: &[Row],
    curves: &[(String, Vec<(f64, f64)>)],
    dir: &Path,
) -> Result<()> {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |b| format!("{b:.4}"));
    let mut md = format!(
        "{intro}\n\n\
         | variant | seed | sampling | parameters | val bits/dim | FD (classifier) | NaN samples | train s | sample s/image | grid |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut csv = String::from(
        "variant,seed,sampling,params,val_bpd,fd,non_finite,train_s,sample_s_per_image,grid\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} | {} | {:.0} | {:.4} | [png]({}) |\n",
            r.variant,
            r.seed,
            r.sampling,
            r.params,
            fmt(r.val_bpd),
            r.fd,
            r.non_finite,
            r.train_s,
            r.sample_s_per_image,
            r.grid
        ));
        csv.push_str(&format!(
            "{:?},{},{:?},{},{},{},{},{},{},{}\n",
            r.variant,
            r.seed,
            r.sampling,
            r.params,
            r.val_bpd.map_or(String::new(), |v| v.to_string()),
            r.fd,
            r.non_finite,
            r.train_s,
            r.sample_s_per_image,
            r.grid
        ));
    }
    md.push_str("\n![validation bits/dim](plots/val_bpd.png)\n![FD](plots/fd.png)\n![training loss](plots/loss.png)\n");
    tarflow_flows::checkpoint::write_atomic(&dir.join("results.md"), md.as_bytes())?;
    tarflow_flows::checkpoint::write_atomic(&dir.join("results.csv"), csv.as_bytes())?;
    // Per-variant figures against the variant's index, one curve per seed × sampling.
    let names: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in rows {
            if !v.contains(&r.variant) {
                v.push(r.variant.clone());
            }
        }
        v
    };
    let mut series_bpd: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut series_fd: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let x = names.iter().position(|n| n == &r.variant).unwrap_or(0) as f64;
        let key = format!("seed {} {}", r.seed, r.sampling);
        let push = |s: &mut Vec<(String, Vec<(f64, f64)>)>, y: f64| match s
            .iter_mut()
            .find(|(k, _)| *k == key)
        {
            Some((_, p)) => p.push((x, y)),
            None => s.push((key.clone(), vec![(x, y)])),
        };
        if let Some(b) = r.val_bpd {
            push(&mut series_bpd, b);
        }
        push(&mut series_fd, r.fd);
    }
    let label = format!(
        "variant: {}",
        names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let draw = |file: &str,
                title: &str,
                y: &str,
                s: &[(String, Vec<(f64, f64)>)],
                x: &str|
     -> Result<()> {
        let refs: Vec<tarflow_train::plot::Series> =
            s.iter().map(|(k, p)| (k.as_str(), p.as_slice())).collect();
        tarflow_train::plot::line_plot(&dir.join("plots").join(file), title, x, y, &refs)
    };
    draw(
        "val_bpd.png",
        "validation bits/dim per variant",
        "bits/dim",
        &series_bpd,
        &label,
    )?;
    draw(
        "fd.png",
        "FD (classifier features) per variant",
        "FD",
        &series_fd,
        &label,
    )?;
    draw("loss.png", "training loss", "loss", curves, "step")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{write_results, Row};

    #[test]
    fn every_row_fills_every_column_of_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let row = Row {
            variant: "v".into(),
            seed: 1,
            sampling: "plain".into(),
            params: 10,
            val_bpd: Some(5.5),
            fd: 30.0,
            train_s: 123.4,
            sample_s_per_image: 0.0021,
            non_finite: 7,
            grid: "g.png".into(),
        };
        std::fs::create_dir_all(dir.path().join("plots")).unwrap();
        write_results("intro", &[row], &[], dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
        let header = md.lines().find(|l| l.starts_with("| variant")).unwrap();
        let line = md.lines().find(|l| l.starts_with("| v |")).unwrap();
        assert_eq!(
            header.matches(" | ").count(),
            line.matches(" | ").count(),
            "{line}"
        );
        assert!(line.contains("| 30.000 | 7 | 123 | 0.0021 |"), "{line}");
    }
}
