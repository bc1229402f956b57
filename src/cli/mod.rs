//! Subcommand definitions and dispatch.

mod bench;
mod classify;
mod data;
mod dataset;
mod experiment;
mod fd;
mod import;
mod info;
mod latent;
mod ood;
mod quantize;
mod runtime;
mod sample;
mod score;
mod train;
mod train_ae;
mod vae;

use clap::{Parser, Subcommand};

/// Transformer autoregressive normalizing flows (TarFlow / STARFlow).
#[derive(Debug, Parser)]
#[command(name = "tarflow", version, about)]
pub struct Cli {
    /// Run on candle's composed ops even on the CPU (the path CUDA and Metal take) instead of
    /// the fused CPU kernels; the same switch as TARFLOW_CPU_KERNELS=0.
    #[arg(long, global = true)]
    composed: bool,
    /// Run block-quantised layers (a `tarflow quantize` .gguf) on candle's integer matmul, which
    /// quantises the activations too (not exactly invertible), instead of expanding each layer's
    /// weights for the call; the same switch as TARFLOW_QMATMUL=native.
    #[arg(long, global = true)]
    native_qmatmul: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a checkpoint's model config and parameter count.
    Info(info::InfoArgs),
    /// Convert an ml-tarflow state_dict (.pth or .safetensors) into a tarflow checkpoint.
    Import(import::ImportArgs),
    /// Inspect datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a model from a TOML config (or resume a run).
    Train(train::TrainArgs),
    /// Generate images from a trained flow (default: the embedded MNIST model).
    Sample(Box<sample::SampleArgs>),
    /// Exact negative log-likelihood and bits/dim of image files or a dataset (default model: the embedded MNIST one).
    Score(score::ScoreArgs),
    /// Out-of-distribution detection: AUROC of bits/dim and of the typicality test.
    Ood(ood::OodArgs),
    /// Classify labelled images by Bayes' rule with a class-conditional model.
    Classify(classify::ClassifyArgs),
    /// Fréchet distance of samples to held-out images in a small classifier's feature space.
    Fd(fd::FdArgs),
    /// Run an ablation: variants of a base config, trained and measured, with a results table.
    Experiment(experiment::ExperimentArgs),
    /// Measure training, scoring, sampling and loader throughput.
    Bench(bench::BenchArgs),
    /// Store the Linear weights in reduced precision (f16, bf16, q8_0, q4_0, q4k, …) as a .gguf
    /// that every command loads, and measure the exact bits/dim it costs.
    Quantize(Box<quantize::QuantizeArgs>),
    /// Encode images to latents and decode latents with a diffusers KL autoencoder (SD-VAE's
    /// architecture): the space latent STARFlow models.
    #[command(subcommand)]
    Vae(vae::VaeCommand),
    /// Train a small KL autoencoder from a TOML config; it is saved as a diffusers folder.
    TrainAe(train_ae::TrainAeArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.composed {
        tarflow_flows::kernels::set_enabled(false);
    }
    if cli.native_qmatmul {
        tarflow_flows::quant::set_native_matmul(true);
    }
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Import(a) => import::run(a),
        Command::Train(a) => train::run(a),
        Command::Sample(a) => sample::run(*a),
        Command::Score(a) => score::run(a),
        Command::Ood(a) => ood::run(a),
        Command::Classify(a) => classify::run(a),
        Command::Fd(a) => fd::run(a),
        Command::Experiment(a) => experiment::run_cmd(a),
        Command::Bench(a) => bench::run(a),
        Command::Quantize(a) => quantize::run(*a),
        Command::Data(c) => data::run(c),
        Command::Vae(c) => vae::run(c),
        Command::TrainAe(a) => train_ae::run(a),
    }
}
