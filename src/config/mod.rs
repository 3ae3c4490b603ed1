//! Configuration: YAML file + `PORTCULLIS_*` environment overrides + secret files,
//! parsed and validated once into typed structs.

mod env;
pub mod raw;
pub mod secret;
mod validate;

pub use secret::{CookieKey, Secret};
pub use validate::*;

use std::fmt;
use std::path::Path;

/// One configuration problem, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "config error: {}", self.message)
        } else {
            write!(f, "config error: {}: {}", self.key, self.message)
        }
    }
}

/// All problems found in one configuration (never empty).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

/// Reads, overlays the environment, and validates the configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )
    })?;
    load_str(&text, std::env::vars())
}

/// Parses YAML text with the given environment (`PORTCULLIS_*` variables override keys).
pub fn load_str(
    text: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut value: serde_yaml::Value = if text.trim().is_empty() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        serde_yaml::from_str(text)
            .map_err(|e| ConfigError::new("", format!("invalid YAML: {e}")))?
    };
    env::overlay(&mut value, vars)?;
    let raw: raw::RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        ConfigError::new(key, e.into_inner().to_string())
    })?;
    validate::validate(raw)
}

/// Every key with its environment variable and default, e.g. for `portcullis env-vars`.
pub fn env_keys() -> Vec<((String, String), String)> {
    env::schema_keys()
        .into_iter()
        .map(|(path, default)| {
            let d = serde_yaml::to_string(&default).unwrap_or_default();
            ((path.join("."), env::var_name(&path)), d.trim().to_string())
        })
        .collect()
}
