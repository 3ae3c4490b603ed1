use clap::Parser;

use portcullis::cli::{new_secret, worker_threads, Cli, Command, PROCESS_VARS};
use std::process::ExitCode;
use std::time::SystemTime;

/// Exit code for an invalid configuration.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // Set but empty (a chart's default) is not set: the environment alone configures it.
    if std::env::var_os("PORTCULLIS_CONFIG").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("PORTCULLIS_CONFIG");
    }
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    match command {
        Command::Secret => {
            println!("{}", new_secret());
            return ExitCode::SUCCESS;
        }
        Command::EnvVars => {
            // Written, not println!: a reader that stops early (`| head`) is no panic.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let keys = portcullis::config::env_keys()
                .into_iter()
                .map(|((key, var), default)| (var, key, default));
            let process = PROCESS_VARS.iter().map(|(var, what, default)| {
                (var.to_string(), what.to_string(), default.to_string())
            });
            for (var, what, default) in keys.chain(process) {
                if writeln!(out, "{var:<50} {what}  (default: {default})").is_err() {
                    return ExitCode::FAILURE;
                }
            }
            return match out.flush() {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Command::Check | Command::Serve => {}
    }
    // Without a file (no --config, no PORTCULLIS_CONFIG) the environment alone configures it.
    let path = cli.config;
    let loaded = match &path {
        Some(path) => portcullis::config::load(path),
        None => portcullis::config::load_str("", std::env::vars()),
    };
    let cfg = match loaded {
        Ok(c) => c,
        Err(errors) => {
            // Without a file, keys missing from the environment may be a forgotten file; a
            // bad value is only that (its line names the key).
            let missing = errors
                .0
                .iter()
                .any(|e| e.message.starts_with("is required"));
            if path.is_none() && missing {
                eprintln!("config error: no configuration file (pass --config FILE or set PORTCULLIS_CONFIG), and the PORTCULLIS_* environment alone is incomplete:");
            }
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Read before `check` returns, so that it finds a bad value too.
    let workers = match worker_threads(std::env::var("PORTCULLIS_WORKER_THREADS").ok().as_deref()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(command, Command::Check) {
        let dates = portcullis::server::tls::certificate_warnings(&cfg, SystemTime::now());
        for w in cfg.warnings().into_iter().chain(dates) {
            eprintln!("warning: {w}");
        }
        for name in portcullis::config::unknown_env_vars(std::env::vars()) {
            eprintln!("warning: environment variable {name} names no configuration key; ignored (see `portcullis env-vars`)");
        }
        match &path {
            Some(p) => println!("config ok: {}", p.display()),
            None => println!("config ok: (environment)"),
        }
        return ExitCode::SUCCESS;
    }
    init_tracing(&cfg.log);
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    for name in portcullis::config::unknown_env_vars(std::env::vars()) {
        tracing::warn!(
            variable = &*name,
            "environment variable names no configuration key; ignored (see `portcullis env-vars`)"
        );
    }
    raise_open_file_limit(cfg.limits.max_connections);
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("rustls crypto provider already installed");
    }
    // Worker threads: the cores this process may use (affinity and cgroup quota aware), or
    // PORTCULLIS_WORKER_THREADS. One core: a single-threaded runtime, which skips the
    // work-stealing machinery entirely.
    let workers =
        workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    // Look for network events after every 16 task polls instead of tokio's 61: under load a
    // worker then hands requests to the upstream and answers to clients in smaller, steadier
    // batches, so the processes at the other ends run along instead of sleeping and being
    // woken in bursts. Measured with the load harness, five interleaved pairs of runs: 4 %
    // more requests a second and 4 % less CPU per request, better in each pair.
    builder.event_interval(16);
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(portcullis::run(cfg, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = e.to_string().as_str(), "portcullis failed");
            ExitCode::FAILURE
        }
    };
    // The last lines (the shutdown's) out before the process ends, unless the log's reader
    // has stalled.
    portcullis::logging::flush(std::time::Duration::from_secs(2));
    code
}

/// Every client connection is an open file, and so is each upstream connection: a soft limit
/// of 1024 (systemd's and many containers' default) would stop the listeners, the admin
/// probes' included, long before `limits.max_connections`. Raised to the hard limit, as Go
/// programs and nginx's `worker_rlimit_nofile` do; a warning when even that is short.
fn raise_open_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    // An unlimited hard limit still stops at the kernel's fs.nr_open (1048576 by default).
    for target in [limit.rlim_max, limit.rlim_max.min(1 << 20)] {
        if limit.rlim_cur >= target {
            break;
        }
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
            break;
        }
    }
    // A proxied request holds two files (the client's and the upstream's), and the rest of
    // the process a few dozen.
    let wanted = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    if limit.rlim_cur < wanted {
        tracing::warn!(
            open_files = limit.rlim_cur,
            "the open-file limit (ulimit -n) is below twice limits.max_connections: past it, new connections fail (the admin listener's too); raise the limit or lower limits.max_connections"
        );
    }
}

fn init_tracing(log: &portcullis::config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    // `log.level` already holds `RUST_LOG` when that is set (checked with the config).
    let mut filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // rustls warns of each odd handshake (an IP address as SNI, a renegotiation attempt),
    // quoting what the client sent, and h2 of each odd frame (a PING acknowledged that was
    // never sent): a line per client handshake or frame is theirs to flood the log with.
    // Their errors still show; a level that names the crate decides for itself.
    for quiet in ["rustls", "h2"] {
        if !log.level.contains(quiet) {
            if let Ok(quiet) = format!("{quiet}=error").parse() {
                filter = filter.add_directive(quiet);
            }
        }
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    portcullis::logging::start_queue();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(portcullis::logging::OneLineStderr {
            controls: !terminal,
            json: log.json,
        });
    if log.json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
