//! AdamW (PyTorch semantics, decoupled weight decay) whose moments can be saved and restored,
//! which candle_nn's AdamW does not allow (ARCHITECTURE.md).

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use std::collections::HashMap;

/// AdamW hyper-parameters (ml-tarflow: β 0.9/0.95, weight decay 1e-4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    /// f32 master copies of variables held in a lower precision (bf16 training).
    master: HashMap<String, Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `vars` (name, variable), with zero moments.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        let mut master = HashMap::new();
        for (name, var) in &vars {
            // Separate buffers: the moments are updated in place.
            let z = || Tensor::zeros(var.shape(), DType::F32, var.device());
            m.insert(name.clone(), z()?);
            v.insert(name.clone(), z()?);
            if var.dtype() != DType::F32 {
                // Updates of size lr·1e-4 vanish when rounded to bf16: accumulate them in f32.
                master.insert(
                    name.clone(),
                    var.as_tensor().detach().to_dtype(DType::F32)?.copy()?,
                );
            }
        }
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            master,
            step: 0,
        })
    }

    /// Replaces the f32 master copies of low-precision variables by exact saved weights (resume).
    pub fn set_master(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        for (name, w) in self.master.iter_mut() {
            if let Some(t) = weights.get(name) {
                *w = t.detach().to_dtype(DType::F32)?.copy()?;
            }
        }
        Ok(())
    }

    /// The current weights in f32 by name (master copies where the variables are low-precision).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(k, v)| {
                let t = match self.master.get(k) {
                    Some(m) => m.clone(),
                    None => v.as_tensor().detach().to_dtype(DType::F32)?.copy()?,
                };
                Ok((k.clone(), t))
            })
            .collect()
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`Self::step`] with every gradient multiplied by `scale` (clipping) on the way in.
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient tensor links back to the whole forward graph, which the
            // moments would otherwise keep alive step after step.
            let (m, v) = (&self.m[name], &self.v[name]);
            if !self.master.contains_key(name) && crate::inplace::applies(&[var, m, v, g]) {
                crate::inplace::moments(m, v, g, (c.beta1, c.beta2), scale)?;
                var.inplace_op3(
                    m,
                    v,
                    &crate::inplace::AdamUpdate {
                        decay: 1.0 - lr * c.weight_decay,
                        lr,
                        bc1,
                        bc2,
                        eps: c.eps,
                    },
                )?;
                continue;
            }
            let g = (g.detach().to_dtype(DType::F32)? * scale)?;
            let m = ((&self.m[name] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[name] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = match self.master.get(name) {
                Some(w) => w.clone(),
                None => var.as_tensor().detach().to_dtype(DType::F32)?,
            };
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let p = ((p * (1.0 - lr * c.weight_decay))? - (update * lr)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            if self.master.contains_key(name) {
                self.master.insert(name.clone(), p);
            }
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The state as named tensors (`m.{param}`, `v.{param}`, copies: the moments change in
    /// place) and the step count.
    pub fn state(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.copy()?);
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.copy()?);
        }
        Ok((out, self.step))
    }

    /// Restores a state saved by [`Self::state`]; every moment must be present with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, var) in &self.vars {
            for (prefix, store) in [("m", &mut self.m), ("v", &mut self.v)] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks `{key}`"))
                })?;
                if t.dims() != var.dims() {
                    return Err(candle_core::Error::Msg(format!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                // Copied: the moments are updated in place and must own their storage.
                store.insert(
                    name.clone(),
                    t.to_device(var.device())?.to_dtype(DType::F32)?.copy()?,
                );
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
    }

    /// Reference AdamW on scalars, written out from PyTorch's documented algorithm.
    fn reference(p0: f64, grads: &[f64], lr: f64, c: AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            p *= 1.0 - lr * c.weight_decay;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            p -=
                lr * (m / (1.0 - c.beta1.powi(t))) / ((v / (1.0 - c.beta2.powi(t))).sqrt() + c.eps);
        }
        p
    }

    #[test]
    fn matches_the_pytorch_update_and_resumes_exactly() {
        let c = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let x = var(&[1.5, -2.0]);
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], c).unwrap();
        let mut seen = [vec![], vec![]];
        for _ in 0..5 {
            // loss = Σ x³ → g = 3x²
            let loss = x.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            for (i, xi) in x.as_tensor().to_vec1::<f32>().unwrap().iter().enumerate() {
                seen[i].push(3.0 * (*xi as f64).powi(2));
            }
            opt.step(&g, 0.01).unwrap();
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for (i, p0) in [1.5, -2.0].iter().enumerate() {
            let want = reference(*p0, &seen[i], 0.01, c);
            assert!(
                (got[i] as f64 - want).abs() < 1e-6,
                "param {i}: {} vs {want}",
                got[i]
            );
        }
        // Save, restore into a fresh optimizer, and both take the same next step.
        let (state, step) = opt.state().unwrap();
        let y = var(&got);
        let mut opt2 = AdamW::new(vec![("x".into(), y.clone())], c).unwrap();
        opt2.load_state(&state, step).unwrap();
        let gx = x
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gy = y
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&gx, 0.01).unwrap();
        opt2.step(&gy, 0.01).unwrap();
        assert_eq!(
            x.as_tensor().to_vec1::<f32>().unwrap(),
            y.as_tensor().to_vec1::<f32>().unwrap()
        );
        let mut bad = state.clone();
        bad.remove("v.x");
        assert!(opt2
            .load_state(&bad, 1)
            .unwrap_err()
            .to_string()
            .contains("v.x"));
    }
}
