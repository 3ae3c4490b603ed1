use clap::Parser;
use portcullis::cli::{new_secret, Cli, Command};
use std::process::ExitCode;

/// Exit code for an invalid configuration.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    match command {
        Command::Secret => {
            println!("{}", new_secret());
            return ExitCode::SUCCESS;
        }
        Command::EnvVars => {
            for (path, default) in portcullis::config::env_keys() {
                println!("{:<50} {}  (default: {})", path.1, path.0, default);
            }
            return ExitCode::SUCCESS;
        }
        Command::Check | Command::Serve => {}
    }
    let Some(path) = cli.config else {
        eprintln!(
            "config error: no configuration file: pass --config FILE (or set PORTCULLIS_CONFIG)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let cfg = match portcullis::config::load(&path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(command, Command::Check) {
        println!("config ok: {}", path.display());
        return ExitCode::SUCCESS;
    }
    init_tracing(&cfg.log);
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("rustls crypto provider already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portcullis::run(cfg, Some(path))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "portcullis failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(log: &portcullis::config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if log.json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
