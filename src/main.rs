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
    #[cfg(not(target_os = "macos"))]
    keep_freed_pages();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {}", message(&e));
        std::process::exit(1);
    }
}

/// Tells mimalloc never to return freed memory to the OS. By default it purges freed pages
/// after 10 ms; a training step frees its activations and allocates them again a few hundred
/// ms later, and each purged page comes back as a fresh page the kernel zeroes (19 % of a
/// training step's cycles in `clear_page_erms`, 4 % without purging, nearly all of it the first
/// touch). Peak memory is what it was; it is just kept. A user's `MIMALLOC_PURGE_DELAY` wins.
#[cfg(not(target_os = "macos"))]
fn keep_freed_pages() {
    // `mi_option_purge_delay` in mimalloc.h's `mi_option_t` (v2 and v3 alike); the Rust
    // bindings do not name it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option; mimalloc reads it when it next considers purging.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
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
