//! AdamW (PyTorch semantics, decoupled weight decay) whose moments can be saved and restored,
//! which candle_nn's AdamW does not allow (ARCHITECTURE.md).

use crate::grads::GradSource;
use candle_core::{DType, Result, Tensor, Var};
use std::cell::RefCell;
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

/// A variable's first and second moments.
#[derive(Debug)]
enum Moments {
    /// In memory, for f32 variables on the CPU: updated with the variable in one pass
    /// ([`crate::inplace::AdamStep`]; candle lends no mutable view of a tensor's storage).
    Host(Vec<f32>, Vec<f32>),
    /// Tensors on the variable's device, in f32.
    Tensors(Tensor, Tensor),
}

impl Moments {
    /// Whether `var`'s moments live in memory.
    fn on_host(var: &Var) -> bool {
        var.dtype() == DType::F32 && var.device().is_cpu() && var.is_contiguous()
    }

    /// Zero moments for `var`.
    fn zeros(var: &Var) -> Result<Self> {
        if Self::on_host(var) {
            let n = var.elem_count();
            return Ok(Moments::Host(vec![0.0; n], vec![0.0; n]));
        }
        let z = || Tensor::zeros(var.shape(), DType::F32, var.device());
        Ok(Moments::Tensors(z()?, z()?))
    }

    /// (m, v) as tensors shaped like `var` (copies).
    fn tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        match self {
            Moments::Host(m, v) => Ok((
                Tensor::from_slice(m, var.shape(), var.device())?,
                Tensor::from_slice(v, var.shape(), var.device())?,
            )),
            Moments::Tensors(m, v) => Ok((owned(m)?, owned(v)?)),
        }
    }
}

/// A detached copy of `t` in a buffer of its own ([`tarflow_flows::device::fresh`]): what is
/// updated in place, or must survive a `Var::set`, never shares storage.
pub(crate) fn owned(t: &Tensor) -> Result<Tensor> {
    tarflow_flows::device::fresh(t).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Saved state `t` (weights, moments) back on `device` in f32, cast on the host first.
fn on_device_f32(t: &Tensor, device: &candle_core::Device) -> Result<Tensor> {
    tarflow_flows::device::upload(t, device, DType::F32)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// [`on_device_f32`] in a buffer of its own.
pub(crate) fn owned_on(t: &Tensor, device: &candle_core::Device) -> Result<Tensor> {
    owned(&on_device_f32(t, device)?)
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    moments: HashMap<String, Moments>,
    /// f32 master copies of variables held in a lower precision (bf16 training).
    master: HashMap<String, Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `vars` (name, variable), with zero moments.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut moments = HashMap::new();
        let mut master = HashMap::new();
        for (name, var) in &vars {
            moments.insert(name.clone(), Moments::zeros(var)?);
            if var.dtype() != DType::F32 {
                // Updates of size lr·1e-4 vanish when rounded to bf16: accumulate them in f32.
                master.insert(name.clone(), owned(&var.as_tensor().to_dtype(DType::F32)?)?);
            }
        }
        Ok(Self {
            cfg,
            vars,
            moments,
            master,
            step: 0,
        })
    }

    /// Replaces the f32 master copies of low-precision variables by exact saved weights (resume).
    pub fn set_master(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        for (name, w) in self.master.iter_mut() {
            if let Some(t) = weights.get(name) {
                *w = owned_on(t, w.device())?;
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
                    None => owned(&v.as_tensor().to_dtype(DType::F32)?)?,
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
    pub fn step(&mut self, grads: &impl GradSource, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`Self::step`] with every gradient multiplied by `scale` (clipping) on the way in.
    pub fn step_scaled(&mut self, grads: &impl GradSource, lr: f64, scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (name, var) in &self.vars {
            let Some(g) = grads.grad(name, var) else {
                continue;
            };
            let Some(moments) = self.moments.get_mut(name) else {
                continue;
            };
            let (m, v) = match moments {
                Moments::Host(m, v) => {
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    var.inplace_op2(
                        &g,
                        &crate::inplace::AdamStep {
                            m: RefCell::new(m),
                            v: RefCell::new(v),
                            betas: (c.beta1, c.beta2),
                            scale,
                            decay: 1.0 - lr * c.weight_decay,
                            lr,
                            bias_corrections: (bc1, bc2),
                            eps: c.eps,
                        },
                    )?;
                    continue;
                }
                Moments::Tensors(m, v) => (m, v),
            };
            // Detached: a gradient tensor links back to the whole forward graph, which the
            // moments would otherwise keep alive step after step.
            let g = (g.detach().to_dtype(DType::F32)? * scale)?;
            let m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
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
            *moments = Moments::Tensors(m, v);
        }
        Ok(())
    }

    /// The state as named tensors (`m.{param}`, `v.{param}`, copies: the moments change in
    /// place) and the step count.
    pub fn state(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for (k, var) in &self.vars {
            if let Some(mo) = self.moments.get(k) {
                let (m, v) = mo.tensors(var)?;
                out.insert(format!("m.{k}"), m);
                out.insert(format!("v.{k}"), v);
            }
        }
        Ok((out, self.step))
    }

    /// Restores a state saved by [`Self::state`]; every moment must be present with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, var) in &self.vars {
            let read = |prefix: &str| -> Result<Tensor> {
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
                on_device_f32(t, var.device())
            };
            let (m, v) = (read("m")?, read("v")?);
            // Copied: the moments are updated in place and must own their storage.
            let moments = if Moments::on_host(var) {
                Moments::Host(
                    m.flatten_all()?.to_vec1::<f32>()?,
                    v.flatten_all()?.to_vec1::<f32>()?,
                )
            } else {
                Moments::Tensors(owned(&m)?, owned(&v)?)
            };
            self.moments.insert(name.clone(), moments);
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
