//! Exponential moving average of the weights, kept in f32 beside the trained variables.

use crate::optim::owned;
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
                let w = tarflow_flows::device::upload(w, s.device(), DType::F32)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                *s = owned(&w)?;
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

    /// The average starts from the weights as they were, not from the buffer the optimizer
    /// overwrites: after one AdamW step it is d·w₀ + (1 − d)·w₁ exactly. On Metal, where
    /// `Tensor::copy` shares the buffer, a shared start would give w₁ here. Runs on
    /// `TARFLOW_TEST_DEVICE` (scripts/metal-check.sh sets it), in f32 and bf16.
    #[test]
    fn the_starting_values_survive_the_first_optimizer_step() {
        let name = std::env::var("TARFLOW_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
        let dev = tarflow_flows::device::select(&name).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let w0 = [0.5f32, -1.0, 2.0, 0.25];
            let host = Tensor::new(&w0, &Device::Cpu).unwrap();
            let v = Var::from_tensor(&tarflow_flows::device::upload(&host, &dev, dtype).unwrap())
                .unwrap();
            let vars = vec![("w".to_string(), v.clone())];
            let mut ema = Ema::new(&vars, 0.9).unwrap();
            let mut opt = crate::optim::AdamW::new(vars.clone(), Default::default()).unwrap();
            let loss = v
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step_scaled(&loss.backward().unwrap(), 0.1, 1.0)
                .unwrap();
            let read = |t: &Tensor| {
                tarflow_flows::device::host_f64(t)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let w1 = read(v.as_tensor());
            assert!(
                w1.iter()
                    .zip(&w0)
                    .all(|(a, b)| (a - *b as f64).abs() > 0.05),
                "{dtype:?}: the step moved every weight ({w1:?})"
            );
            ema.update_with(&vars, 0.5).unwrap();
            let got = read(&ema.weights()["w"]);
            for i in 0..4 {
                let want = 0.5 * w0[i] as f64 + 0.5 * w1[i];
                assert!(
                    (got[i] - want).abs() < 1e-6,
                    "{dtype:?} on {name}: EMA[{i}] = {}, expected ½·w₀ + ½·w₁ = {want} (w₁ = {})",
                    got[i],
                    w1[i]
                );
            }
        }
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
