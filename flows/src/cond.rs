//! Conditioning of one pass: class labels per row, text embeddings per row, or none (the mean
//! class embedding).

use candle_core::Tensor;

/// Conditioning of one pass.
#[derive(Debug, Clone, Copy)]
pub enum Cond<'a> {
    /// One label per row; negative labels (dropped) use the mean class embedding.
    Labels(&'a [i64]),
    /// No label: the mean class embedding for every row (zero for unconditional models).
    Null,
    /// Precomputed text embeddings, a prefix the blocks that read text attend to.
    Text(Text<'a>),
}

/// Text embeddings of a pass: rows `from .. from + n` of `y` (·, L, txt_dim), and the
/// unconditional prompt guidance contrasts them with (`null`, (1 or ·, L, txt_dim); zeros when
/// absent).
#[derive(Debug, Clone, Copy)]
pub struct Text<'a> {
    /// The prompts' embeddings.
    pub y: &'a Tensor,
    /// The unconditional prompt's.
    pub null: Option<&'a Tensor>,
    /// First row of `y` this pass reads.
    pub from: usize,
}

impl<'a> Text<'a> {
    /// Every row of `y`, with `null` for guidance.
    pub fn new(y: &'a Tensor, null: Option<&'a Tensor>) -> Self {
        Self { y, null, from: 0 }
    }

    /// `n` rows of the prompts from this pass's first.
    pub fn prompts(&self, n: usize) -> candle_core::Result<Tensor> {
        self.y.narrow(0, self.from, n)
    }

    /// `n` rows of the unconditional prompt (zeros unless given).
    pub fn nulls(&self, n: usize) -> candle_core::Result<Tensor> {
        let (_, l, d) = self.y.dims3()?;
        match self.null {
            Some(u) if u.dim(0)? == 1 => u.broadcast_as((n, l, d))?.contiguous(),
            Some(u) => u.narrow(0, self.from, n),
            None => Tensor::zeros((n, l, d), self.y.dtype(), self.y.device()),
        }
    }
}

impl<'a> Cond<'a> {
    /// The conditioning of `labels` for a model of `num_classes` classes: the labels where the
    /// model is conditional and some row has one (≥ 0), else none (the mean embedding for all).
    pub fn of(num_classes: usize, labels: Option<&'a [i64]>) -> Self {
        match labels {
            Some(l) if num_classes > 0 && l.iter().any(|&v| v >= 0) => Cond::Labels(l),
            _ => Cond::Null,
        }
    }

    /// The conditioning of rows `a..b` of the batch (a share run on its own).
    pub fn rows(self, a: usize, b: usize) -> Self {
        match self {
            Cond::Labels(l) => Cond::Labels(&l[a..b]),
            Cond::Null => Cond::Null,
            Cond::Text(t) => Cond::Text(Text {
                from: t.from + a,
                ..t
            }),
        }
    }
}
