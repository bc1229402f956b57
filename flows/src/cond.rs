//! Class conditioning of one pass: labels per row, or none (the mean class embedding).

/// Class conditioning of one pass.
#[derive(Debug, Clone, Copy)]
pub enum Cond<'a> {
    /// One label per row; negative labels (dropped) use the mean class embedding.
    Labels(&'a [i64]),
    /// No label: the mean class embedding for every row (zero for unconditional models).
    Null,
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
        }
    }
}
