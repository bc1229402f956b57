//! The `tarflow` command line: each subcommand is a thin call into a workspace crate.

mod cli;

// candle allocates a fresh buffer per op; mimalloc reuses pages instead of zeroing new ones.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
