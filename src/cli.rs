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
