//! What the inverse pass can be asked: guidance (rule, target, annealing, blocks), attention
//! temperature, and the Jacobi solver's options and report.

use crate::error::{FlowError, Result};

/// Which of (α, μ) classifier-free guidance extrapolates (ml-tarflow's `guide_what`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum GuideWhat {
    /// The log-scale α only (`"a"`).
    #[cfg_attr(feature = "clap", value(name = "a", alias = "alpha"))]
    Alpha,
    /// The shift μ only (`"b"`).
    #[cfg_attr(feature = "clap", value(name = "b", alias = "mu"))]
    Mu,
    /// Both (`"ab"`, the default).
    #[default]
    #[cfg_attr(feature = "clap", value(name = "ab", alias = "both"))]
    Both,
}

impl std::str::FromStr for GuideWhat {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "a" | "alpha" => Ok(GuideWhat::Alpha),
            "b" | "mu" => Ok(GuideWhat::Mu),
            "ab" | "both" => Ok(GuideWhat::Both),
            _ => Err(FlowError::Input(format!(
                "guide_what must be one of a, b, ab; got {s:?}"
            ))),
        }
    }
}

/// How the conditional and unconditional predictions are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum GuidanceRule {
    /// TarFlow: extrapolate α and μ linearly, `p + w·(p_c − p_u)`.
    #[default]
    #[cfg_attr(feature = "clap", value(alias = "tarflow"))]
    Linear,
    /// STARFlow's closed form for Gaussians: `s = min(σc/σu, 1)²`, `σ̃ = σc/√(1+w−ws)`,
    /// `μ̃ = ((1+w)μc − wsμu)/(1+w−ws)` (ignores `annealed` and `guide_what`).
    #[cfg_attr(feature = "clap", value(alias = "starflow"))]
    Gaussian,
}

impl std::str::FromStr for GuidanceRule {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" | "tarflow" => Ok(GuidanceRule::Linear),
            "gaussian" | "starflow" => Ok(GuidanceRule::Gaussian),
            _ => Err(FlowError::Input(format!(
                "guidance rule must be linear or gaussian; got {s:?}"
            ))),
        }
    }
}

/// Initial guess of a block's input for the Jacobi solver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum JacobiInit {
    /// Zeros.
    Zeros,
    /// The block's output (its z), a good guess where the block changes little.
    #[default]
    Input,
}

impl std::str::FromStr for JacobiInit {
    type Err = FlowError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zeros" => Ok(JacobiInit::Zeros),
            "input" => Ok(JacobiInit::Input),
            _ => Err(FlowError::Input(format!(
                "jacobi init must be zeros or input; got {s:?}"
            ))),
        }
    }
}

/// Options of the parallel (GS-Jacobi) inverse.
#[derive(Debug, Clone, PartialEq)]
pub struct JacobiOptions {
    /// Stop a chunk when `mean((new − old)²) / mean(new²)` falls below this.
    pub tol: f64,
    /// At most this many iterations per chunk (a chunk of L tokens is exact after L).
    pub max_iters: usize,
    /// Tokens per Gauss-Seidel chunk, solved one after another; 0 = the whole sequence.
    pub chunk: usize,
    /// Per-block chunk sizes in sampling order (first = the block sampled first); overrides
    /// `chunk` where given.
    pub block_chunks: Vec<usize>,
    /// Initial guess.
    pub init: JacobiInit,
}

impl Default for JacobiOptions {
    fn default() -> Self {
        Self {
            tol: 1e-8,
            max_iters: 64,
            chunk: 0,
            block_chunks: Vec::new(),
            init: JacobiInit::Input,
        }
    }
}

/// How one block's Jacobi solve went.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSolve {
    /// Block index in x→z order.
    pub block: usize,
    /// Causal passes over the block, summed over its chunks.
    pub iterations: usize,
    /// Chunks solved.
    pub chunks: usize,
    /// Iterations per token of the block: near 1/L for an easy block, 1 for one that needs
    /// as many passes as the sequential solver ("tough").
    pub toughness: f64,
    /// The relative change at the last iteration of the last chunk.
    pub last_change: f64,
}

/// Options of the inverse pass (ml-tarflow's `Model.reverse` keyword arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReverseOptions {
    /// Guidance weight w; 0 turns guidance off.
    pub guidance: f64,
    /// Ramp the weight along the sequence: `g_i = (i+1)/(T−1)·w`, restarted in every block.
    pub annealed: bool,
    /// What the guidance extrapolates.
    pub guide_what: GuideWhat,
    /// Attention temperature of the unconditional (guidance) pass.
    pub attn_temp: f64,
    /// How the two predictions are combined.
    pub rule: GuidanceRule,
    /// Guide only the first K blocks sampled (the last K in x→z order, STARFlow: 1, the deep
    /// block); 0 guides every block.
    pub guide_blocks: usize,
}

impl ReverseOptions {
    /// Whether block `k` of `nb` (x→z order) is guided: `guide_blocks` = K guides the first K
    /// blocks sampled, the last K in x→z order; 0 guides all.
    pub fn guides_block(&self, k: usize, nb: usize) -> bool {
        self.guidance > 0.0 && (self.guide_blocks == 0 || k + self.guide_blocks >= nb)
    }
}

impl Default for ReverseOptions {
    fn default() -> Self {
        Self {
            guidance: 0.0,
            annealed: false,
            guide_what: GuideWhat::Both,
            attn_temp: 1.0,
            rule: GuidanceRule::Linear,
            guide_blocks: 0,
        }
    }
}
