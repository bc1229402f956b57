//! Data-parallel training under `mpirun` (the `mpi` feature; `.ci/run` installs OpenMPI and
//! runs this file): two ranks train exactly as one process with `train.grad_accum = 2`, a rank
//! killed with SIGKILL stops the other with the dead rank and the last good checkpoint named,
//! the run then resumes, and ranks that disagree about the config refuse to start.
#![cfg(feature = "mpi")]

mod common;

use common::{assert_same_checkpoint, text, TINY};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tarflow")
}

/// `mpirun` with what this machine's MPI needs (root in CI containers; OpenMPI counts cores,
/// and CI has two, so allow as many ranks as asked).
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1");
    let open_mpi = Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("Open MPI"))
        .unwrap_or_else(|e| panic!("mpirun not found ({e}): install openmpi-bin"));
    if open_mpi {
        c.arg("--oversubscribe");
    }
    c
}

fn config(dir: &Path, extra: &str) -> String {
    let path = dir.join("tiny.toml");
    std::fs::write(
        &path,
        format!("{TINY}\n[output]\ndir = \"{}\"\n{extra}", dir.display()),
    )
    .unwrap();
    path.display().to_string()
}

fn losses(run: &Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                v["step"].as_u64()?,
                v["loss"].as_f64()?,
                v["grad_norm"].as_f64()?,
            ))
        })
        .collect()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

#[test]
fn two_ranks_train_exactly_as_one_process_accumulating_two_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let solo = Command::new(bin())
        .args(["train", "--config", &cfg, "--set", "output.name=solo"])
        .args(["--set", "train.grad_accum=2"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    ok(&solo);
    let two = mpirun()
        .args(["-np", "2", bin(), "train", "--config", &cfg])
        .args(["--set", "output.name=mpi"])
        .output()
        .unwrap();
    ok(&two);
    let (a, b) = (dir.path().join("solo"), dir.path().join("mpi"));
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 24, "{}", text(&solo));
    // Bit-identical: each rank's gradient is its micro-batch's, halved exactly (a power of
    // two), and the two-term sum is the same whichever order it is taken in.
    assert_eq!(
        la, lb,
        "losses and gradient norms of 1 process × 2 micro-batches vs 2 ranks"
    );
    for step in ["step-0000008", "step-0000024"] {
        assert_same_checkpoint(&a, &b, &format!("checkpoints/{step}"));
    }
    // Rank 0 alone wrote the run: one metrics line per step, not two.
    let stderr = String::from_utf8_lossy(&two.stderr);
    assert!(stderr.contains("data-parallel over 2 ranks"), "{stderr}");
    assert_eq!(stderr.matches("checkpoint: ").count(), 3, "{stderr}");
}

#[test]
fn a_killed_rank_stops_the_other_naming_it_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let run = dir.path().join("fault");
    let sets = [
        "--set",
        "output.name=fault",
        "--set",
        "train.max_steps=100000",
        "--set",
        "eval.every=0",
        "--set",
        "eval.sample_every=0",
    ];
    let job = mpirun()
        .args(["-np", "2", bin(), "train", "--config", &cfg])
        .args(sets)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a checkpoint of step 16 or later, then kill rank 1 (found by the rank MPI gave
    // it). Any later one will do: at thousands of images a second the run can write and prune
    // step 16's between two looks.
    let past_step_16 = || {
        std::fs::read_dir(run.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("step-")?.parse::<u64>().ok())
                    .is_some_and(|step| step >= 16)
            })
    };
    let t0 = Instant::now();
    while !past_step_16() {
        if t0.elapsed() > Duration::from_secs(120) {
            // Stop the job (mpirun passes SIGTERM on to its ranks): left running, its busy
            // ranks would slow every later run on the machine.
            let _ = Command::new("kill")
                .args(["-TERM", &job.id().to_string()])
                .status();
            let out = job.wait_with_output().unwrap();
            panic!(
                "no checkpoint written in 120 s; the job said:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rank1 = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&*dir.path().to_string_lossy())
                && env
                    .split(|&b| b == 0)
                    .any(|kv| kv == b"OMPI_COMM_WORLD_RANK=1")
        })
        .expect("rank 1's process");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status()
        .unwrap();
    let out = job.wait_with_output().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "the job took {:?} to stop",
        killed.elapsed()
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("Rank 1 (pid {rank1}) has died"))
            && stderr.contains("The last good checkpoint is")
            && stderr.contains("mpirun -np 2 tarflow train --resume"),
        "{stderr}"
    );
    // Resume from the last good checkpoint with two ranks, then one (accumulating two).
    let latest = tarflow::train::checkpoints::RunDir::new(&run)
        .latest()
        .unwrap()
        .expect("a checkpoint");
    let step: u64 = latest
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("step-")
        .parse()
        .unwrap();
    let more = format!("train.max_steps={}", step + 4);
    ok(&mpirun()
        .args(["-np", "2", bin(), "train", "--resume"])
        .arg(&run)
        .args(["--set", &more])
        .output()
        .unwrap());
    let more = format!("train.max_steps={}", step + 8);
    ok(&Command::new(bin())
        .args(["train", "--resume"])
        .arg(&run)
        .args(["--set", &more, "--set", "train.grad_accum=2"])
        .output()
        .unwrap());
    assert_eq!(losses(&run).last().map(|l| l.0), Some(step + 8));
}

#[test]
fn ranks_with_different_configs_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let out = mpirun()
        .args(["-np", "1", bin(), "train", "--config", &cfg])
        .args(["--set", "output.name=mixed", ":"])
        .args(["-np", "1", bin(), "train", "--config", &cfg])
        .args(["--set", "output.name=mixed", "--set", "optim.lr=1e-3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the ranks must train on the same config and data"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("mixed/checkpoints").exists(),
        "a refused run wrote checkpoints"
    );
}
