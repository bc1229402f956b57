//! One training variable per transformer layer on the CPU.
//!
//! The fused layer ([`crate::kernels::layer`]) reads its twelve weights as one (·, C) matrix.
//! Built from twelve variables, that matrix costs candle's backward a join, a zeroed gradient
//! buffer and an add for the join and for each weight, and a cut of the join's gradient back
//! into twelve: about a tenth of a small model's training step. A model built for training on
//! the CPU ([`crate::Checkpoint::trainable_model`]) therefore holds each layer's weights as one
//! variable, `{layer}.packed` (rows of C in [`PARAMS`] order), and its layers read views of it.
//!
//! Only the trainer's variables are packed: checkpoints, EMA weights and optimizer moments are
//! written and read under the usual parameter names, through [`Packing::unpack`] and
//! [`Packing::pack`] at those boundaries.

use crate::config::ModelConfig;
use crate::error::{FlowError, Result};
use crate::kernels::layer::PARAMS;
use crate::params::param_specs;
use candle_core::Tensor;
use std::collections::HashMap;

/// The last component of a packed variable's name, `blocks.{k}.attn_blocks.{l}.packed`.
pub const PACKED: &str = "packed";

/// One packed variable: its name, the model width and its parts (name, shape) in order.
#[derive(Debug, Clone)]
struct Group {
    name: String,
    c: usize,
    parts: Vec<(String, Vec<usize>)>,
}

/// Which transformer layers of a model travel as one packed variable.
#[derive(Debug, Clone, Default)]
pub struct Packing {
    groups: Vec<Group>,
}

impl Packing {
    /// Every transformer layer of `cfg`; none where its layers are not ml-tarflow's (the
    /// packed layout is the fused layer's: [`ModelConfig::plain_layers`]).
    pub fn all(cfg: &ModelConfig) -> Result<Self> {
        if !cfg.plain_layers() {
            return Ok(Self::default());
        }
        let shapes: HashMap<String, Vec<usize>> = param_specs(cfg)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
        let mut groups = Vec::new();
        for k in 0..cfg.num_blocks {
            for l in 0..cfg.block_layers(k) {
                let layer = format!("blocks.{k}.attn_blocks.{l}");
                let parts = PARAMS
                    .iter()
                    .map(|p| {
                        let name = format!("{layer}.{p}");
                        let shape = shapes.get(&name).cloned().ok_or_else(|| {
                            FlowError::Config(format!("packing: the model has no `{name}`"))
                        })?;
                        Ok((name, shape))
                    })
                    .collect::<Result<_>>()?;
                groups.push(Group {
                    name: format!("{layer}.{PACKED}"),
                    c: cfg.channels,
                    parts,
                });
            }
        }
        Ok(Self { groups })
    }

    /// The layers of `cfg` whose packed variable is among `names` (a trainer's variables).
    pub fn among<'a>(cfg: &ModelConfig, names: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let names: std::collections::HashSet<&str> = names.into_iter().collect();
        let mut all = Self::all(cfg)?;
        all.groups.retain(|g| names.contains(g.name.as_str()));
        Ok(all)
    }

    /// `named` with each layer's parts (keys `{prefix}{part}`) joined into its packed tensor
    /// (`{prefix}{layer}.packed`); an error names a missing part.
    pub fn pack(
        &self,
        named: &HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = named.clone();
        for g in &self.groups {
            let mut rows = Vec::with_capacity(g.parts.len());
            for (name, _) in &g.parts {
                let key = format!("{prefix}{name}");
                let t = out.remove(&key).ok_or_else(|| {
                    FlowError::Input(format!(
                        "`{key}` is missing (every transformer layer weight is expected)"
                    ))
                })?;
                rows.push(t.reshape((t.elem_count() / g.c, g.c))?);
            }
            out.insert(format!("{prefix}{}", g.name), Tensor::cat(&rows, 0)?);
        }
        Ok(out)
    }

    /// The inverse of [`Self::pack`]: each packed tensor present cut back into its parts, as
    /// views of it (the trainer's weights and moments come here as copies already; its EMA
    /// weights are written or scored before the next update).
    pub fn unpack(
        &self,
        mut named: HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<HashMap<String, Tensor>> {
        for g in &self.groups {
            if let Some(p) = named.remove(&format!("{prefix}{}", g.name)) {
                for (name, t) in g.views(&p)? {
                    named.insert(format!("{prefix}{name}"), t);
                }
            }
        }
        Ok(named)
    }

    /// `named` (a model's variables) with every packed tensor's parts added as views of it,
    /// so that layers built from them pass their gradients on to the packed variable.
    pub fn with_views(&self, named: &mut HashMap<String, Tensor>) -> Result<()> {
        for g in &self.groups {
            if let Some(p) = named.get(&g.name).cloned() {
                named.extend(g.views(&p)?);
            }
        }
        Ok(())
    }
}

impl Group {
    /// The parts of packed tensor `p` as views, by name.
    fn views(&self, p: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let flat = p.flatten_all()?;
        let total: usize = self
            .parts
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        if flat.elem_count() != total {
            return Err(FlowError::Config(format!(
                "`{}` has {} values, expected {total}",
                self.name,
                flat.elem_count()
            )));
        }
        let mut at = 0;
        let mut out = Vec::with_capacity(self.parts.len());
        for (name, shape) in &self.parts {
            let n: usize = shape.iter().product();
            out.push((name.clone(), flat.narrow(0, at, n)?.reshape(shape.clone())?));
            at += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn packing_round_trips_every_layer_weight_and_names_a_missing_one() {
        let mut cfg = ModelConfig::new(3, 8, 2, 64, 2, 2, 3);
        cfg.head_dim = 32;
        let named = crate::params::init_params(&cfg, 4, &Device::Cpu).unwrap();
        let p = Packing::all(&cfg).unwrap();
        let packed = p.pack(&named, "").unwrap();
        // 2 blocks × 2 layers, 12 weights each, became 4 variables.
        assert_eq!(packed.len(), named.len() - 4 * 12 + 4);
        let rows = (2 * 64 + 4 * 64 * 64 + 4 * 64 + 2 * 64 + 2 * 4 * 64 * 64 + 4 * 64 + 64) / 64;
        assert_eq!(packed["blocks.1.attn_blocks.0.packed"].dims(), [rows, 64]);
        let among = Packing::among(&cfg, packed.keys().map(|k| k.as_str())).unwrap();
        let back = among.unpack(packed, "").unwrap();
        assert_eq!(back.len(), named.len());
        for (k, t) in &named {
            let d = (t - &back[k]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(
                d.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap(),
                0.0,
                "{k}"
            );
            assert_eq!(t.dims(), back[k].dims(), "{k}");
        }
        let mut moments: HashMap<String, Tensor> = named
            .iter()
            .map(|(k, t)| (format!("m.{k}"), t.clone()))
            .collect();
        moments.remove("m.blocks.0.attn_blocks.1.mlp.norm.bias");
        let err = p.pack(&moments, "m.").unwrap_err().to_string();
        assert!(
            err.contains("`m.blocks.0.attn_blocks.1.mlp.norm.bias` is missing"),
            "{err}"
        );
    }
}
