//! Where a training config comes from: a path or a bare name (`experiments/NAME.toml`), and the
//! `--set section.key=value` overrides applied to it, each checked as it is applied.

use crate::error::{Result, TrainError};
use std::path::{Path, PathBuf};

/// Finds a config: a path as given, else `experiments/NAME.toml` (or `experiments/NAME`).
pub fn resolve(name: &str) -> Result<PathBuf> {
    let direct = PathBuf::from(name);
    if direct.is_file() {
        return Ok(direct);
    }
    for cand in [
        Path::new("experiments").join(format!("{name}.toml")),
        Path::new("experiments").join(name),
    ] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(TrainError::config(
        name,
        "no such file, and no `experiments/{name}.toml` under the current directory",
    ))
}

/// Splits `section.key=value` and parses the value as TOML (a bare word becomes a string).
fn parse_override(s: &str) -> Result<(Vec<String>, toml::Value)> {
    let origin = format!("--set {s}");
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| TrainError::config(&origin, "expected section.key=value"))?;
    let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
    if path.len() < 2 || path.iter().any(String::is_empty) {
        return Err(TrainError::config(
            &origin,
            "the key must name a section and a key, e.g. train.max_steps",
        ));
    }
    let value = value.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((path, parsed))
}

/// Applies overrides to a parsed table; each one is checked by deserialising the result as a
/// `C` (the config type), so that an error blames the override that caused it.
pub fn apply_overrides<C: serde::de::DeserializeOwned>(
    mut table: toml::Table,
    sets: &[String],
) -> Result<toml::Table> {
    for s in sets {
        let origin = format!("--set {s}");
        let (path, value) = parse_override(s)?;
        let mut t = &mut table;
        for section in &path[..path.len() - 1] {
            let entry = t
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            t = entry.as_table_mut().ok_or_else(|| {
                TrainError::config(&origin, format!("`{section}` is not a section"))
            })?;
        }
        t.insert(path[path.len() - 1].clone(), value);
        // Deserialise after each override so the error blames the right one.
        toml::Value::Table(table.clone())
            .try_into::<C>()
            .map_err(|e| TrainError::config(&origin, e.message().to_string()))?;
    }
    Ok(table)
}
