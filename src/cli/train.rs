//! `tarflow train`: runs or resumes a training run with a live progress bar.

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tarflow_train::trainer::loss_to_bpd;
use tarflow_train::{Event, Outcome, TrainConfig, Trainer};

/// Arguments of `tarflow train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Config file, or a bare name looked up as `experiments/NAME.toml`.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    config: Option<String>,
    /// Continue the run in this directory from its `latest` checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.max_steps=2000` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// Where to train (overrides train.device).
    #[arg(long, value_enum)]
    device: Option<tarflow_flows::device::DeviceKind>,
    /// Only check the config and that its data paths exist, then stop.
    #[arg(long)]
    check: bool,
}

/// Runs `tarflow train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let mut sets = a.sets.clone();
    if let Some(d) = a.device {
        sets.push(format!("train.device={}", d.name()));
    }
    // One process, or this rank of `mpirun -np N` (the `mpi` feature).
    let group = tarflow_train::dist::from_env()?;
    let rank = group.rank();
    // The device is selected once, here, and passed down (a second Metal device would be a
    // second id that refuses the first one's tensors).
    let select = |cfg: &TrainConfig, group: &dyn tarflow_train::dist::Group| {
        let (device, why) = tarflow_train::dist::device_for(&cfg.train.device, group)?;
        // `auto` says what it took where there was a choice (a GPU build, or a GPU found).
        let chose = tarflow_flows::device::gpu_built() || !device.is_cpu();
        if cfg.train.device == "auto" && chose && group.rank() == 0 {
            eprintln!("device: {why}");
        }
        anyhow::Ok(device)
    };
    let (mut trainer, warnings) = match (&a.config, &a.resume) {
        (_, Some(dir)) => {
            let cfg = Trainer::config_of_run(dir, &sets)?;
            let device = select(&cfg, group.as_ref())?;
            Trainer::resume_in(dir, cfg, group, &device)?
        }
        (Some(c), None) => {
            let cfg = TrainConfig::load(c, &sets)?;
            if a.check {
                tarflow_train::data::check_path(&cfg, cfg.data.path.as_deref(), "data.path")?;
                tarflow_train::data::check_path(
                    &cfg,
                    cfg.data.val_path.as_deref(),
                    "data.val_path",
                )?;
                println!(
                    "config {c}: ok (the data paths exist; their images are read and checked against [model] when training starts)"
                );
                return Ok(());
            }
            let device = select(&cfg, group.as_ref())?;
            Trainer::start_in(cfg, group, &device)?
        }
        (None, None) => bail!("give --config FILE or --resume RUN_DIR"),
    };
    let lead = rank == 0;
    if let (Some(dir), true) = (&a.resume, trainer.steps_done() >= trainer.max_steps()) {
        // Nothing to do, and nothing of the run is touched.
        if lead {
            println!(
                "{} is already finished: step {} of train.max_steps = {}. To train further: \
                 tarflow train --resume {} --set train.max_steps={}",
                dir.display(),
                trainer.steps_done(),
                trainer.max_steps(),
                dir.display(),
                trainer.max_steps().max(1) * 2
            );
        }
        return Ok(());
    }
    if lead {
        for w in warnings {
            eprintln!("warning: {w}");
        }
        if let Some(n) = tarflow_train::dist::launched_size().filter(|&n| n > 1) {
            eprintln!(
                "data-parallel over {n} ranks: each takes 1/{n} of every global batch; rank 0 writes the run"
            );
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // First Ctrl-C (or SIGTERM): finish the step, write a checkpoint, exit. Second: exit at
        // once. Under MPI, a signal that arrives while a rank has died or a collective hangs
        // is the launcher stopping a failed job: say which rank and where to resume from.
        ctrlc::set_handler(move || {
            if tarflow_train::dist::launched_size().is_some_and(|n| n > 1)
                && tarflow_train::dist::in_fault()
            {
                eprintln!(
                    "error: rank {rank}: stopped by the launcher. {}",
                    tarflow_train::dist::fault_report()
                );
                std::process::exit(1);
            }
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            if lead {
                eprintln!(
                    "\ninterrupt: writing a checkpoint after this step (Ctrl-C again to quit now)"
                );
            }
        })?;
    }
    let tty = std::io::stderr().is_terminal() && lead;
    let bar = if lead {
        ProgressBar::new(trainer.max_steps())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg} ETA {eta}",
        )?
        .progress_chars("=> "),
    );
    // A hidden bar (no terminal: CI, nohup) drops its println, so print straight to stderr.
    let say = |m: String| {
        if tty {
            bar.println(m)
        } else {
            eprintln!("{m}")
        }
    };
    // A latent run's bits/dim are of the continuous latent density, and say so.
    let (unit, to_bpd): (&str, fn(f64) -> f64) = match trainer.latent() {
        true => (
            "latent bits/dim",
            tarflow_flows::model::continuous_loss_to_bpd,
        ),
        false => ("bits/dim", loss_to_bpd),
    };
    let mut smooth: Option<f64> = None;
    let mut last_ips = 0.0;
    let mut on = |ev: Event| match ev {
        Event::Start {
            step,
            max_steps,
            train_images,
            val_images,
            params,
            device,
            dtype,
        } => {
            bar.set_position(step);
            let ops = if device == "cpu" && dtype == "f32" && tarflow_flows::kernels::enabled() {
                "CPU kernels"
            } else {
                "composed ops"
            };
            say(format!(
                "training {params} parameters on {train_images} images ({val_images} held out), \
                 steps {step}→{max_steps}, on {device} in {dtype} ({ops})"
            ));
        }
        Event::Step {
            step,
            epoch,
            loss,
            lr,
        } => {
            let s = smooth.map_or(loss, |m| 0.9 * m + 0.1 * loss);
            smooth = Some(s);
            bar.set_position(step);
            bar.set_message(format!(
                "ep {epoch:.2} loss {s:.4} bpd {:.3} lr {lr:.2e} {last_ips:.0} img/s",
                to_bpd(s)
            ));
        }
        Event::Log(r) => {
            last_ips = r.images_per_s.unwrap_or(0.0);
            if !tty {
                eprintln!(
                    "step {} epoch {:.2} loss {:.4} bpd {:.3} lr {:.2e} {:.0} img/s{}",
                    r.step,
                    r.epoch,
                    r.loss.unwrap_or(f64::NAN),
                    r.bpd.unwrap_or(f64::NAN),
                    r.lr.unwrap_or(f64::NAN),
                    last_ips,
                    r.allreduce_s
                        .map(|s| format!(" allreduce {:.1} ms/step", s * 1e3))
                        .unwrap_or_default()
                );
            }
        }
        Event::Eval(r) => say(format!(
            "step {}: validation {:.4} {unit}{}",
            r.step,
            r.val_bpd.unwrap_or(f64::NAN),
            r.val_bpd_ema
                .map(|v| format!(" (EMA {v:.4})"))
                .unwrap_or_default()
        )),
        Event::Samples(p) => say(format!("samples: {}", p.display())),
        Event::Checkpoint(p) => say(format!("checkpoint: {}", p.display())),
    };
    let result = trainer.run(&stop, &mut on);
    bar.finish_and_clear();
    let s = result?;
    if !lead {
        if s.outcome == Outcome::Interrupted {
            std::process::exit(130);
        }
        return Ok(());
    }
    let run = s.run_dir.display();
    println!(
        "{} at step {} after {:.1} s; last loss {}; validation {unit} {}{}",
        match s.outcome {
            Outcome::Finished => "finished",
            Outcome::Interrupted => "interrupted",
        },
        s.step,
        s.elapsed_s,
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.val_bpd.map_or("-".into(), |v| format!("{v:.4}")),
        s.val_bpd_ema
            .map(|v| format!(" (EMA {v:.4})"))
            .unwrap_or_default()
    );
    if let Some(c) = &s.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    println!("run: {run} (metrics.jsonl, plots/, samples/)");
    if s.outcome == Outcome::Interrupted {
        let launch = match tarflow_train::dist::launched_size() {
            Some(n) if n > 1 => format!("mpirun -np {n} "),
            _ => String::new(),
        };
        println!("resume with: {launch}tarflow train --resume {run}");
        std::process::exit(130);
    }
    Ok(())
}
