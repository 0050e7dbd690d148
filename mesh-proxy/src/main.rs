//! `mesh-proxy`: the mesh as a standalone proxy, for workloads not written in Rust.
//!
//! The proxy is a thin composition of the mesh crates: inbound listeners (mTLS from peers,
//! authorization, rate limiting, to the local application), outbound listeners (routing,
//! balancing, retries, circuit breaking, mTLS to peers) and an admin listener, configured
//! by one TOML file (see `examples/config/mesh.toml` for every section).
//!
//! ```text
//! mesh-proxy check mesh.toml           # validate; exit 0 when valid, 1 when not
//! mesh-proxy check mesh.toml --print   # ... and print the effective config, defaults filled in
//! mesh-proxy run --config mesh.toml    # serve
//! ```
//!
//! `run` starts only when the configuration validates (every error names its key). It
//! takes its identity from `[identity]` (PEM files or the SPIFFE Workload API, both
//! rotating without a restart), serves each `[[inbound]]` listener (mTLS, authorization,
//! rate limit, then the local application, which gets the peer's SPIFFE ID in a header
//! the proxy always overwrites), each `[[outbound]]` listener (plaintext from the local
//! application, routed by `[[routes]]` to `[services]`, HTTP/2 over mTLS to the peer
//! proxies), and `[admin]` (`/metrics`, `/ready`, `/live`, `/config`, `POST /shutdown`,
//! `POST /reload`).
//!
//! A `transparent = true` outbound listener (Linux) takes connections an iptables
//! `REDIRECT` rule sent it (`packaging/iptables/mesh-redirect.sh`) and meshes each by its
//! original destination: the service whose `addresses` hold it, or passthrough / refuse
//! by `unmatched` (see `src/transparent.rs`).
//!
//! SIGTERM or Ctrl-C (on Windows also Ctrl-Break and the console's close, log-off and
//! shutdown events): stop accepting, drain within `drain_timeout`, exit 0. SIGHUP (or
//! `POST /reload`): re-read the file and apply its services, routes, authorization
//! policies and rate limits without dropping a connection, or keep the running
//! configuration when it is invalid or changes what needs a restart (identity,
//! listeners, `[tcp]`; logged, and counted in `mesh_proxy_reloads_total{result="invalid"}`).
//!
//! Flags override the file, and `MESH_*` environment variables the flags' defaults:
//! `--admin` / `MESH_ADMIN`, `--log` / `MESH_LOG` (an `EnvFilter`, default `info`),
//! `--log-format` / `MESH_LOG_FORMAT` (`plain` or `json`), `--workers` / `MESH_WORKERS`
//! (runtime worker threads, default 1: a sidecar's share of a machine; one worker runs a
//! current-thread runtime, more a multi-threaded one).
//!
//! A listener with `access_log = true` logs each request, when its response ends, as one
//! event on the `mesh_access` target (see `mesh_tower::access_log`), whatever `--log`
//! says of other targets unless it names that one (`--log warn,mesh_access=off`).

// The command line's output is its interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin;
mod notify;
mod proxy;
mod transparent;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_core::config::{AdminConfig, MeshConfig};

#[derive(Debug, Parser)]
#[command(name = "mesh-proxy", version, about = "The mesh service-mesh proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file without starting, reporting every error.
    Check {
        /// The TOML configuration file.
        config: PathBuf,
        /// Print the effective configuration, with every default filled in.
        #[arg(long)]
        print: bool,
    },
    /// Serve: the inbound, outbound and admin listeners of the configuration.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The TOML configuration file.
    #[arg(long, env = "MESH_CONFIG")]
    config: PathBuf,
    /// The admin listener's address, instead of the file's `[admin] listen`.
    #[arg(long, env = "MESH_ADMIN")]
    admin: Option<SocketAddr>,
    /// What to log: a tracing `EnvFilter` (`info`, `mesh_tower=debug,info`, ...).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
    /// How to log.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Worker threads of the runtime: 1 (the default) runs everything on one thread, like
    /// nginx's and HAProxy's single worker; more spread connections over that many threads.
    #[arg(long, env = "MESH_WORKERS", default_value_t = 1)]
    workers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, print } => check(&config, print),
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --log `{}`: {e}", args.log);
            return ExitCode::FAILURE;
        }
    };
    // Access logs are on or off by listener (`access_log`), whatever the level of the
    // rest, unless the filter says otherwise about their target.
    let filter = if args.log.contains(mesh_tower::access_log::TARGET) {
        filter
    } else {
        match format!("{}=info", mesh_tower::access_log::TARGET).parse() {
            Ok(directive) => filter.add_directive(directive),
            Err(_) => filter,
        }
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let installed = match args.log_format {
        LogFormat::Plain => subscriber.try_init(),
        LogFormat::Json => subscriber.json().try_init(),
    };
    if let Err(e) = installed {
        eprintln!("error: installing the logger: {e}");
        return ExitCode::FAILURE;
    }
    let mut config = match MeshConfig::from_file(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(listen) = args.admin {
        // The flag moves the listener; the file's other admin settings stay.
        let decisions = config.admin.as_ref().map_or(0, |a| a.decisions);
        config.admin = Some(AdminConfig { listen, decisions });
    }
    if args.workers == 0 {
        eprintln!("error: --workers must be at least 1");
        return ExitCode::FAILURE;
    }
    // One worker: a current-thread runtime, whose tasks wake each other without atomics
    // shared between threads or work stealing (as linkerd2-proxy does with one core).
    let mut builder = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(args.workers);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, args.config))
}

async fn serve(config: MeshConfig, path: PathBuf) -> ExitCode {
    let started = tokio::select! {
        started = proxy::Proxy::start(config, path) => started,
        () = signals::terminate() => {
            tracing::info!("terminated while starting");
            return ExitCode::SUCCESS;
        }
    };
    let proxy = match started {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "not starting");
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addrs = proxy.addrs();
    for (name, addr) in &addrs {
        // One line per listener on stdout, for scripts and tests that bind port 0.
        println!("listening {name} {addr}");
    }
    notify::notify(&format!(
        "READY=1\nSTATUS=serving on {} listeners",
        addrs.len()
    ));
    let state = proxy.state.clone();
    loop {
        tokio::select! {
            () = signals::terminate() => {
                tracing::info!("terminating: draining");
                break;
            }
            () = state.shutdown.notified() => {
                tracing::info!("shutdown: draining");
                break;
            }
            () = signals::hangup() => proxy.reload().await,
            () = state.reload.notified() => proxy.reload().await,
        }
    }
    notify::notify("STOPPING=1\nSTATUS=draining");
    proxy.shutdown().await;
    tracing::info!("drained; exiting");
    ExitCode::SUCCESS
}

mod signals {
    /// SIGTERM or Ctrl-C; on Windows, Ctrl-C, Ctrl-Break and the console's close, log-off
    /// and shutdown events.
    pub(crate) async fn terminate() {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        // A console program on Windows: Ctrl-C, Ctrl-Break, its console closing, and the
        // user logging off or the system shutting down (for these last, tokio's handler
        // holds the process until the drain ends or Windows' own deadline passes).
        #[cfg(windows)]
        {
            use tokio::signal::windows::{ctrl_break, ctrl_close, ctrl_logoff, ctrl_shutdown};
            match (ctrl_break(), ctrl_close(), ctrl_logoff(), ctrl_shutdown()) {
                (Ok(mut brk), Ok(mut close), Ok(mut logoff), Ok(mut shutdown)) => {
                    tokio::select! {
                        _ = brk.recv() => {}
                        _ = close.recv() => {}
                        _ = logoff.recv() => {}
                        _ = shutdown.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                _ => {
                    tracing::warn!(
                        "cannot watch the console's close and shutdown events; Ctrl-C only"
                    );
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(any(unix, windows)))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }

    /// SIGHUP (never, where there is none).
    pub(crate) async fn hangup() {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut hup) = signal(SignalKind::hangup()) {
                hup.recv().await;
                return;
            }
        }
        std::future::pending::<()>().await;
    }
}

fn check(path: &std::path::Path, print: bool) -> ExitCode {
    let config = match MeshConfig::from_file(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}: valid", path.display());
    println!("  {}", summary(&config));
    if print {
        match toml::to_string_pretty(&config) {
            Ok(text) => println!("\n{text}"),
            Err(e) => {
                eprintln!("error: cannot print the effective config: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn summary(c: &MeshConfig) -> String {
    let identity = match &c.identity {
        None => "none (plaintext only)",
        Some(mesh_core::config::IdentityConfig::Spire { .. }) => "SPIFFE Workload API",
        Some(mesh_core::config::IdentityConfig::Files { .. }) => "PEM files",
        Some(_) => "other",
    };
    format!(
        "identity: {identity}; {} services, {} routes, {} inbound and {} outbound listeners, \
         {} authorization policies, {} rate limits",
        c.services.len(),
        c.routes.len(),
        c.inbound.len(),
        c.outbound.len(),
        c.authorization.len(),
        c.rate_limits.len(),
    )
}
