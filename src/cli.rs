//! Command line: `portcullis [serve] --config FILE`, `portcullis check --config FILE`, `portcullis secret`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "OpenID Connect authentication gateway for unmodified web apps"
)]
pub struct Cli {
    /// Configuration file (YAML). Every key can be overridden by PORTCULLIS_<KEY> variables.
    #[arg(long, short = 'c', env = "PORTCULLIS_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the configuration and exit (0: valid, 2: invalid).
    Check,
    /// Print a fresh random cookie secret (base64 of 32 bytes).
    Secret,
    /// List the environment variables that override configuration keys.
    EnvVars,
}

/// A fresh cookie secret, base64 (standard alphabet, padded).
pub fn new_secret() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(crate::session::crypto::random_bytes::<32>())
}

/// Variables of the process rather than of a configuration key, for `portcullis env-vars`:
/// (name, what it sets, default).
pub const PROCESS_VARS: &[(&str, &str, &str)] = &[
    (
        "PORTCULLIS_CONFIG",
        "the configuration file (--config)",
        "unset",
    ),
    (
        "PORTCULLIS_WORKER_THREADS",
        "worker threads",
        "the cores available to the process",
    ),
];

/// The most worker threads `PORTCULLIS_WORKER_THREADS` may ask for: far more than any machine
/// has cores, and far fewer than would exhaust memory or the process limit at start-up.
pub const MAX_WORKER_THREADS: usize = 1024;

/// `PORTCULLIS_WORKER_THREADS`: unset, or a number from 1 to [`MAX_WORKER_THREADS`] (anything
/// else is refused, not silently replaced by the default).
pub fn worker_threads(value: Option<&str>) -> Result<Option<usize>, String> {
    let Some(v) = value else {
        return Ok(None);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORKER_THREADS).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "config error: PORTCULLIS_WORKER_THREADS: `{v}` is not a number of threads \
             from 1 to {MAX_WORKER_THREADS}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_is_unset_or_a_bounded_positive_number() {
        assert_eq!(worker_threads(None), Ok(None));
        assert_eq!(worker_threads(Some("4")), Ok(Some(4)));
        assert_eq!(worker_threads(Some(" 2 ")), Ok(Some(2)));
        assert_eq!(worker_threads(Some("1024")), Ok(Some(1024)));
        for bad in ["", "0", "-1", "two", "1.5", "1025", "100000"] {
            let e = worker_threads(Some(bad)).unwrap_err();
            assert!(e.contains("PORTCULLIS_WORKER_THREADS"), "{e}");
        }
    }
}
