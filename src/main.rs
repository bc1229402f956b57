//! The `tarflow` command line: each subcommand is a thin call into a workspace crate.

mod cli;

// candle allocates a fresh buffer per op; mimalloc reuses pages instead of zeroing new ones.
#[cfg(not(target_os = "macos"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() {
    // candle's worker pool spins ~10⁵ times before parking; between the short ops of a step the
    // spinning workers steal the cores rayon's GEMM threads need (≈ 8 % of a training step).
    // Set before candle creates the pool; a user's own setting wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {}", message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each said once: many errors already quote their cause (an I/O
/// error inside "path: reason"), which `{:#}` would repeat.
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !out.contains(&c) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&c);
        }
    }
    out
}
