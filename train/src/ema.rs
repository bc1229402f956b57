//! Exponential moving average of the weights, kept in f32 beside the trained variables.

use crate::optim::{owned, owned_on};
use candle_core::{DType, Result, Tensor, Var};
use std::collections::HashMap;

/// EMA of named variables: `ema ← decay·ema + (1 − decay)·w` after every optimizer step.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: HashMap<String, Tensor>,
}

impl Ema {
    /// Starts the average at the current values of `vars`.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            // Detached (else every average links to the last through the autograd graph and
            // nothing is ever freed) and in a buffer of its own: `detach` shares the storage
            // `Var::set` overwrites, and so does `Tensor::copy` on Metal.
            .map(|(k, v)| Ok((k.clone(), owned(&v.as_tensor().to_dtype(DType::F32)?)?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// Folds the current values of `vars` into the average.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        self.update_with(vars, self.decay)
    }

    /// The configured decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Replaces the average by saved weights (resume).
    pub fn load(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        for (k, s) in self.shadow.iter_mut() {
            if let Some(w) = weights.get(k) {
                *s = owned_on(w, s.device())?;
            }
        }
        Ok(())
    }

    /// Folds `vars` in with an explicit `decay` (a warm-up ramp early in training).
    pub fn update_with(&mut self, vars: &[(String, Var)], decay: f64) -> Result<()> {
        for (k, v) in vars {
            if let Some(s) = self.shadow.get_mut(k) {
                // The average owns its storage (copied at creation and load).
                if crate::inplace::applies(&[s, v.as_tensor()]) {
                    crate::inplace::lerp(s, v.as_tensor(), decay)?;
                    continue;
                }
                let w = v.as_tensor().detach().to_dtype(DType::F32)?;
                *s = ((&*s * decay)? + (w * (1.0 - decay))?)?.detach();
            }
        }
        Ok(())
    }

    /// The averaged weights by name (a checkpoint's tensors).
    pub fn weights(&self) -> &HashMap<String, Tensor> {
        &self.shadow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn averages_with_the_given_decay() {
        let v = Var::from_tensor(&Tensor::new(&[0f32, 10.0], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), v.clone())];
        let mut ema = Ema::new(&vars, 0.9).unwrap();
        v.set(&Tensor::new(&[10f32, 10.0], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&vars).unwrap();
        ema.update(&vars).unwrap();
        let got = ema.weights()["w"].to_vec1::<f32>().unwrap();
        // 0 → 1 → 1.9 ; 10 stays 10.
        assert!(
            (got[0] - 1.9).abs() < 1e-6 && (got[1] - 10.0).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn the_average_holds_no_autograd_history() {
        // A tracked average links to every previous one: memory grew ~2 MB a step.
        let v = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), v)];
        let mut ema = Ema::new(&vars, 0.9).unwrap();
        assert!(!ema.weights()["w"].track_op());
        ema.update(&vars).unwrap();
        assert!(!ema.weights()["w"].track_op());
    }
}
