//! `PORTCULLIS_<KEY>_<SUBKEY>` environment overrides. The variable names are derived
//! from the schema itself (the defaults serialised), so every key has one.

use super::raw::RawConfig;
use super::ConfigError;
use serde_yaml::{Mapping, Value};

const PREFIX: &str = "PORTCULLIS_";

/// Every leaf key path of the schema with its default value (which tells its type), serde
/// aliases included (they are not serialised): every spelling has its variable.
pub fn schema_keys() -> Vec<(Vec<String>, Value)> {
    let mut out = Vec::new();
    if let Ok(v) = serde_yaml::to_value(RawConfig::default()) {
        walk(&v, &mut Vec::new(), &mut out);
    }
    for group in SPELLINGS {
        let dotted = |p: &[String]| p.join(".");
        let Some(default) = out
            .iter()
            .find(|(p, _)| group.contains(&dotted(p).as_str()))
            .map(|(_, v)| v.clone())
        else {
            continue;
        };
        for spelling in group.iter() {
            if !out.iter().any(|(p, _)| dotted(p) == *spelling) {
                let path = spelling.split('.').map(str::to_string).collect();
                out.push((path, default.clone()));
            }
        }
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

/// Settings with more than one spelling (serde aliases, and keys that override another),
/// as dotted paths. A variable for any spelling must win over the file whichever spelling
/// the file uses: the file's other spellings of that setting are dropped first (else the
/// file's would override the variable's, or, for a serde alias, be a duplicate key).
pub const SPELLINGS: &[&[&str]] = &[
    &[
        "timeouts.shutdown",
        "timeouts.shutdown_timeout",
        "lifecycle.shutdown_timeout",
        "shutdown_timeout",
    ],
    // A secret inline or from a file: a variable for either form replaces the file's.
    &["cookie.secrets", "cookie.secrets_file"],
    &["provider.client_secret", "provider.client_secret_file"],
    &["session.redis.password", "session.redis.password_file"],
];

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
    let keys: Vec<(Vec<String>, Value)> = schema_keys()
        .into_iter()
        .filter(|(path, _)| vars.iter().any(|(k, _)| *k == var_name(path)))
        .collect();
    // All removals before any value is set: variables for two spellings of one setting both
    // stay, and meet the same rules as two spellings in a file.
    for (path, _) in &keys {
        let dotted = path.join(".");
        for group in SPELLINGS.iter().filter(|g| g.contains(&dotted.as_str())) {
            for other in group.iter().filter(|o| **o != dotted) {
                remove(root, other);
            }
        }
    }
    for (path, default) in keys {
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

/// Removes the key at a dotted path from the file's tree, if it is there.
fn remove(root: &mut Value, dotted: &str) {
    let mut cur = root;
    let mut parts = dotted.split('.').peekable();
    while let Some(key) = parts.next() {
        let Value::Mapping(m) = cur else {
            return;
        };
        if parts.peek().is_none() {
            m.remove(key);
            return;
        }
        match m.get_mut(key) {
            Some(next) => cur = next,
            None => return,
        }
    }
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
