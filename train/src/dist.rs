//! Data-parallel training across processes. This file says which process this is and holds the
//! collectives the trainer needs: sums, a broadcast, a gather.
//!
//! One process is [`Solo`]. `mpirun -np N tarflow train …` with the `mpi` feature gives `Mpi`,
//! rsmpi over the system's MPI. Every rank computes its share of each global batch, the
//! gradients are summed with one allreduce, and every rank then takes the same AdamW step.
//! MPI's allreduce gives every rank the same sum: a ring or recursive-doubling reduction adds
//! each element once, or in a commutative pair. So the weights stay identical across ranks,
//! and the trainer checks that at every checkpoint.
//!
//! Faults: a rank that dies leaves the others waiting inside a collective. The launcher then
//! sends them SIGTERM, and a watchdog stops them after [`COLLECTIVE_TIMEOUT`] in any case.
//! Either way [`fault_report`] names the dead rank (for ranks on this host, whose process ids
//! were exchanged at start-up) and the last good checkpoint.

use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a collective may wait for the other ranks before this rank gives up.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(45);

/// The processes of one run and the collectives between them, called from the training thread.
pub trait Group {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank ends with the same values.
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Self::sum_f32`] for f64.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `bytes` by rank 0's.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// One value from every rank, in rank order.
    fn gather_u64(&self, v: u64) -> Result<Vec<u64>>;
}

/// A single process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Group for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn gather_u64(&self, v: u64) -> Result<Vec<u64>> {
        Ok(vec![v])
    }
}

/// The number of processes a launcher started, from the variables mpirun, MPICH's hydra and
/// Slurm's PMI set; `None` when not launched by one.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The group this process belongs to: MPI when a launcher started it (and the `mpi` feature is
/// built in), else one process. Call once, from the main thread.
pub fn from_env() -> Result<Box<dyn Group>> {
    match launched_size() {
        #[cfg(feature = "mpi")]
        Some(_) => Ok(Box::new(mpi_group::Mpi::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some(n) if n > 1 => Err(crate::error::TrainError::config(
            "<launcher>",
            format!(
                "started by an MPI launcher with {n} processes, but this tarflow was built \
                 without MPI: build it with `cargo build --release --features mpi` (needs \
                 libopenmpi-dev and libclang-dev), or run one process"
            ),
        )),
        _ => Ok(Box::new(Solo)),
    }
}

/// Rank 0's `mine`, and the ranks whose own `mine` differs from it; every rank learns both, so
/// a check that fails stops all of them instead of leaving some in the next collective.
pub(crate) fn differ_from_rank0(group: &dyn Group, mine: &[u8]) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut theirs = mine.to_vec();
    group.broadcast(&mut theirs)?;
    let mut differ = vec![0.0f64; group.size()];
    differ[group.rank()] = (theirs != mine) as u8 as f64;
    group.sum_f64(&mut differ)?;
    let ranks = (0..differ.len()).filter(|&r| differ[r] > 0.0).collect();
    Ok((theirs, ranks))
}

/// Milliseconds since the epoch at which the pending collective started; 0 when none is.
static PENDING_SINCE: AtomicU64 = AtomicU64::new(0);

/// What to say about resuming when the run stops on a fault (set by the trainer).
static RESUME_HINT: Mutex<String> = Mutex::new(String::new());

/// The ranks on this host and their process ids, for naming a dead one.
static PEERS: Mutex<Vec<(usize, u32)>> = Mutex::new(Vec::new());

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `f` (a collective) marked as pending, for the watchdog and the signal handler.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn pending<T>(f: impl FnOnce() -> T) -> T {
    PENDING_SINCE.store(now_ms().max(1), Ordering::SeqCst);
    let out = f();
    PENDING_SINCE.store(0, Ordering::SeqCst);
    out
}

/// Sets what a fault report says about the last good checkpoint and how to resume.
pub(crate) fn set_resume_hint(hint: String) {
    *RESUME_HINT.lock().unwrap_or_else(|e| e.into_inner()) = hint;
}

/// Exchanges host and process ids so that a dead rank on this host can be named, and starts
/// the watchdog that stops this rank when a collective waits longer than
/// [`COLLECTIVE_TIMEOUT`].
pub(crate) fn watch(group: &dyn Group) -> Result<()> {
    if group.size() == 1 {
        return Ok(());
    }
    let host = host_id();
    let hosts = group.gather_u64(host)?;
    let pids = group.gather_u64(std::process::id() as u64)?;
    *PEERS.lock().unwrap_or_else(|e| e.into_inner()) = hosts
        .iter()
        .zip(&pids)
        .enumerate()
        .filter(|(r, (h, _))| **h == host && *r != group.rank())
        .map(|(r, (_, p))| (r, *p as u32))
        .collect();
    let rank = group.rank();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let since = PENDING_SINCE.load(Ordering::SeqCst);
        if since > 0 && now_ms().saturating_sub(since) > COLLECTIVE_TIMEOUT.as_millis() as u64 {
            eprintln!(
                "error: rank {rank}: no answer from the other ranks for {} s. {}",
                COLLECTIVE_TIMEOUT.as_secs(),
                fault_report()
            );
            std::process::exit(1);
        }
    });
    Ok(())
}

/// Whether a rank on this host has died, or this rank has waited in a collective for more than
/// a few seconds (a step's allreduce takes milliseconds): then a termination signal means the
/// job is failing, not a user's request to stop (which waits for the step to end).
pub fn in_fault() -> bool {
    let since = PENDING_SINCE.load(Ordering::SeqCst);
    (since > 0 && now_ms().saturating_sub(since) > 5_000) || !dead_peers().is_empty()
}

/// The dead ranks this host can see, the last good checkpoint and how to resume.
pub fn fault_report() -> String {
    let dead = dead_peers();
    let who = match dead.as_slice() {
        [] => "A rank stopped or hangs (the launcher's message names it).".to_string(),
        d => format!(
            "Rank {} (pid {}) has died.",
            d.iter()
                .map(|(r, _)| r.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            d.iter()
                .map(|(_, p)| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let hint = RESUME_HINT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    format!("{who} {hint}")
}

/// Ranks on this host whose process is gone (Linux: no /proc entry).
fn dead_peers() -> Vec<(usize, u32)> {
    if !std::path::Path::new("/proc/self").exists() {
        return Vec::new();
    }
    PEERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, pid)| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .copied()
        .collect()
}

/// A hash of this host's name (ranks with equal ids share /proc).
fn host_id() -> u64 {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    name.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(feature = "mpi")]
mod mpi_group {
    use super::{pending, Group};
    use crate::error::{Result, TrainError};
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    /// The ranks of `mpirun -np N` (MPI_COMM_WORLD); finalises MPI when dropped.
    pub struct Mpi {
        world: SimpleCommunicator,
        _universe: mpi::environment::Universe,
    }

    impl Mpi {
        /// Initialises MPI (once per process).
        pub fn init() -> Result<Self> {
            let universe = mpi::initialize().ok_or_else(|| {
                TrainError::config("<launcher>", "MPI is already initialised in this process")
            })?;
            Ok(Self {
                world: universe.world(),
                _universe: universe,
            })
        }
    }

    impl Group for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            pending(|| {
                self.world
                    .all_reduce_into(&send[..], buf, SystemOperation::sum())
            });
            Ok(())
        }
        fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            pending(|| {
                self.world
                    .all_reduce_into(&send[..], buf, SystemOperation::sum())
            });
            Ok(())
        }
        fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
            let root = self.world.process_at_rank(0);
            let mut len = bytes.len() as u64;
            pending(|| root.broadcast_into(&mut len));
            bytes.resize(len as usize, 0);
            pending(|| root.broadcast_into(&mut bytes[..]));
            Ok(())
        }
        fn gather_u64(&self, v: u64) -> Result<Vec<u64>> {
            let mut all = vec![0u64; self.size()];
            pending(|| self.world.all_gather_into(&v, &mut all[..]));
            Ok(all)
        }
    }
}

/// The device this process trains on, selected once (the caller passes it down): `name` as
/// `train.device` says, except that each CUDA rank of a multi-rank run takes the GPU of its
/// index on its host. The second value says what was chosen (and why, for `auto`).
pub fn device_for(name: &str, group: &dyn Group) -> Result<(candle_core::Device, String)> {
    if name == "cuda" && group.size() > 1 {
        let local = local_rank().unwrap_or(group.rank());
        let d = tarflow_flows::device::open_gpu("cuda", local).map_err(|e| {
            crate::error::TrainError::config(
                "train.device",
                format!("rank {} takes GPU {local} of its host: {e}", group.rank()),
            )
        })?;
        return Ok((d, format!("cuda:{local} (rank {})", group.rank())));
    }
    Ok(tarflow_flows::device::select_explained(name)?)
}

/// This rank's index among the ranks on its host (the GPU it takes), from the launcher.
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// GPU ranks sum gradients with NCCL on the devices (one rank per GPU), bootstrapped through
/// MPI: rank 0 makes the NCCL id and broadcasts it.
#[cfg(all(feature = "mpi", feature = "cuda"))]
pub(crate) mod nccl {
    use super::Group;
    use crate::error::{Result, TrainError};
    use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Tensor};

    /// One NCCL communicator over every rank's GPU.
    pub struct Nccl {
        comm: Comm,
    }

    fn err(e: impl std::fmt::Debug) -> TrainError {
        TrainError::config("<nccl>", format!("NCCL: {e:?}"))
    }

    impl Nccl {
        /// Joins the communicator on `device` (this rank's GPU).
        pub fn new(group: &dyn Group, device: &Device) -> Result<Self> {
            let Device::Cuda(dev) = device else {
                return Err(TrainError::config(
                    "train.device",
                    "NCCL needs a CUDA device",
                ));
            };
            let mut bytes = if group.rank() == 0 {
                Id::new()
                    .map_err(err)?
                    .internal()
                    .iter()
                    .map(|&c| c as u8)
                    .collect()
            } else {
                Vec::new()
            };
            group.broadcast(&mut bytes)?;
            let mut raw = [0 as std::ffi::c_char; 128];
            if bytes.len() != raw.len() {
                return Err(err(format!("an id of {} bytes from rank 0", bytes.len())));
            }
            for (r, b) in raw.iter_mut().zip(&bytes) {
                *r = *b as std::ffi::c_char;
            }
            let comm = Comm::from_rank(
                dev.cuda_stream(),
                group.rank(),
                group.size(),
                Id::uninit(raw),
            )
            .map_err(err)?;
            Ok(Self { comm })
        }

        /// Sums `t` (contiguous f32 on this rank's GPU) over the ranks, in place.
        pub fn sum(&self, t: &Tensor) -> Result<()> {
            Ok(t.inplace_op1(&Sum(&self.comm))?)
        }
    }

    struct Sum<'a>(&'a Comm);

    impl InplaceOp1 for Sum<'_> {
        fn name(&self) -> &'static str {
            "tarflow-nccl-sum"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("NCCL sums tensors on a GPU")
        }

        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
            if !l.is_contiguous() || l.start_offset() != 0 {
                candle_core::bail!("NCCL sums a whole contiguous buffer");
            }
            let slice = s.as_cuda_slice_mut::<f32>()?;
            self.0
                .all_reduce_in_place(slice, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok(())
        }
    }
}
