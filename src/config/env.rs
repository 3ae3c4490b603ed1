//! `PORTCULLIS_<KEY>_<SUBKEY>` environment overrides. The variable names are derived
//! from the schema itself (the defaults serialised), so every key has one.

use super::raw::RawConfig;
use super::ConfigError;
use serde_yaml::{Mapping, Value};

const PREFIX: &str = "PORTCULLIS_";

/// Every leaf key path of the schema with its default value (which tells its type).
pub fn schema_keys() -> Vec<(Vec<String>, Value)> {
    let mut out = Vec::new();
    if let Ok(v) = serde_yaml::to_value(RawConfig::default()) {
        walk(&v, &mut Vec::new(), &mut out);
    }
    out
}

fn walk(v: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, Value)>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                if let Some(k) = k.as_str() {
                    path.push(k.to_string());
                    walk(child, path, out);
                    path.pop();
                }
            }
        }
        other => out.push((path.clone(), other.clone())),
    }
}

/// `PORTCULLIS_*` variables that name no key (a typo is otherwise silently ignored). The
/// process's own variables (`PORTCULLIS_CONFIG`, `PORTCULLIS_WORKER_THREADS`) are not keys.
pub fn unknown_vars(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let known: Vec<String> = schema_keys().iter().map(|(p, _)| var_name(p)).collect();
    let mut unknown: Vec<String> = vars
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(PREFIX))
        .filter(|k| !matches!(&k[PREFIX.len()..], "CONFIG" | "WORKER_THREADS"))
        .filter(|k| !known.contains(k))
        .collect();
    unknown.sort();
    unknown
}

/// The environment variable name for a key path, e.g. `PORTCULLIS_PROVIDER_CLIENT_SECRET`.
pub fn var_name(path: &[String]) -> String {
    let mut s = String::from(PREFIX);
    s.push_str(&path.join("_").to_ascii_uppercase());
    s
}

pub fn overlay(
    root: &mut Value,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect();
    if vars.is_empty() {
        return Ok(());
    }
    for (path, default) in schema_keys() {
        let name = var_name(&path);
        let Some((_, text)) = vars.iter().find(|(k, _)| *k == name) else {
            continue;
        };
        let value = match default {
            // Lists: YAML flow syntax (`["a","b"]`) or comma separated.
            Value::Sequence(_) => {
                let t = text.trim();
                if t.starts_with('[') {
                    serde_yaml::from_str(t).map_err(|e| {
                        ConfigError::new(name.clone(), format!("not a valid list: {e}"))
                    })?
                } else {
                    Value::Sequence(
                        t.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(|s| Value::String(s.to_string()))
                            .collect(),
                    )
                }
            }
            Value::Bool(_) | Value::Number(_) => serde_yaml::from_str(text.trim())
                .map_err(|e| ConfigError::new(name.clone(), e.to_string()))?,
            _ => Value::String(text.clone()),
        };
        set(root, &path, value).map_err(|m| ConfigError::new(name.clone(), m))?;
    }
    Ok(())
}

fn set(root: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        if cur.is_null() {
            *cur = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(m) = cur else {
            return Err(format!(
                "`{}` in the file is not a mapping",
                path[..i].join(".")
            ));
        };
        let k = Value::String(key.clone());
        if i + 1 == path.len() {
            m.insert(k, value);
            return Ok(());
        }
        cur = m.entry(k).or_insert(Value::Null);
    }
    Ok(())
}
