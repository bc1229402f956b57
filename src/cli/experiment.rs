//! `tarflow experiment FILE.toml`: run an ablation and write its results table and plots.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tarflow::experiment::{dirs, dry_run, run, Experiment};

/// Arguments of `tarflow experiment`.
#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// The experiment file (base config, overrides, variants or grid, sampling settings).
    file: PathBuf,
    /// Only validate every variant's config and print the runs.
    #[arg(long)]
    dry_run: bool,
}

/// Runs `tarflow experiment`.
pub fn run_cmd(a: ExperimentArgs) -> Result<()> {
    if let Some(n) = tarflow_train::dist::launched_size().filter(|&n| n > 1) {
        anyhow::bail!(
            "`tarflow experiment` runs in one process, but an MPI launcher started {n}: every \
             rank would run every variant into the same folders. Run it without mpirun, or \
             train one variant data-parallel with `mpirun -np {n} tarflow train --config …`"
        );
    }
    let e = Experiment::load(&a.file)?;
    let (runs, results) = dirs(&PathBuf::from("."), &e.name);
    if a.dry_run {
        for (v, seed, params) in dry_run(&e, &runs)? {
            println!("{v}\tseed {seed}\t{params} parameters");
        }
        println!("all variants of {} are valid", a.file.display());
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: checkpointing the current variant; run again to resume");
        })?;
    }
    let rows = run(&e, &runs, &results, &stop, &mut |m| eprintln!("{m}"))?;
    println!(
        "{} results → {}/results.md (runs in {})",
        rows.len(),
        results.display(),
        runs.display()
    );
    Ok(())
}
