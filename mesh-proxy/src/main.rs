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
//! listeners, `[tcp]`, `drain_timeout`; logged, and counted in
//! `mesh_proxy_reloads_total{result="invalid"}`).
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
use mesh_core::config::MeshConfig;

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

/// The most worker threads `--workers` takes: far past what a sidecar needs, short of
/// what a thread limit (a container's pids limit) refuses with a panic.
const MAX_WORKERS: usize = 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, print } => check(&config, print),
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    // Before anything else: where the kernel's record of it is hidden, the start time is
    // the clock now.
    admin::record_start();
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
    // h2 warns of every PING acknowledgement it did not ask for, which any HTTP/2 client
    // can send without end, 17 bytes a line: its warnings stay off unless the filter
    // names it.
    let filter = if args.log.contains("h2") {
        filter
    } else {
        match "h2=error".parse() {
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
    // The flag moves the listener (here and at every reload); the file's other admin
    // settings stay.
    if let Err(e) = proxy::override_admin(&mut config, args.admin, &args.config) {
        eprintln!("error: {e} (the admin address is --admin's)");
        return ExitCode::FAILURE;
    }
    if !(1..=MAX_WORKERS).contains(&args.workers) {
        eprintln!("error: --workers must be between 1 and {MAX_WORKERS}");
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
    let code = runtime.block_on(serve(config, args.config, args.admin));
    // A file read still blocked in a worker of its own (a reload given up on, reading a
    // FIFO or a stale network mount) does not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn serve(config: MeshConfig, path: PathBuf, admin: Option<SocketAddr>) -> ExitCode {
    // Watched from here on: a SIGHUP while starting waits for the first reload, a SIGTERM
    // ends the start.
    let mut signals = signals::Signals::new();
    let starting = match proxy::Proxy::begin(&config, path).await {
        Ok(starting) => starting,
        Err(e) => {
            tracing::error!(error = %e, "not starting");
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state = starting.state.clone();
    // The admin listener serves from here on: a `POST /shutdown` while the rest starts
    // (waiting for the identity, say) ends the start, as SIGTERM does.
    let started = tokio::select! {
        started = proxy::Proxy::start(config, state.clone(), admin) => started,
        () = signals.stop.recv() => {
            tracing::info!("terminated while starting");
            starting.abandon().await;
            return ExitCode::SUCCESS;
        }
        () = state.shutdown.notified() => {
            tracing::info!("shutdown asked for while starting");
            starting.abandon().await;
            return ExitCode::SUCCESS;
        }
    };
    let proxy = match started {
        Ok(p) => p.started(starting),
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
        let reload = tokio::select! {
            () = signals.stop.recv() => {
                tracing::info!("terminating: draining");
                false
            }
            () = state.shutdown.notified() => {
                tracing::info!("shutdown: draining");
                false
            }
            () = signals.hangup.recv() => true,
            () = state.reload.notified() => true,
        };
        if !reload {
            break;
        }
        // A reload that hangs (a discovery file on a stale mount) does not hold up a
        // shutdown: it is dropped, and nothing of it applied.
        let stop = tokio::select! {
            () = proxy.reload() => false,
            () = signals.stop.recv() => {
                tracing::info!("terminating during a reload: draining");
                true
            }
            () = state.shutdown.notified() => {
                tracing::info!("shutdown during a reload: draining");
                true
            }
        };
        if stop {
            break;
        }
    }
    notify::notify("STOPPING=1\nSTATUS=draining");
    proxy.shutdown().await;
    tracing::info!("drained; exiting");
    ExitCode::SUCCESS
}

mod signals {
    //! The process's signals, each watched by one stream from start to exit: a signal that
    //! arrives while the main task is busy (starting, reloading) waits in its stream
    //! instead of being lost, as it would be between two short-lived streams (tokio's
    //! handler stays installed, so the default action would not run either).

    /// What stops or reloads the proxy.
    pub(crate) struct Signals {
        /// What stops it.
        pub(crate) stop: Stop,
        /// What reloads it.
        pub(crate) hangup: Hangup,
    }

    /// SIGTERM or SIGINT (Ctrl-C); on Windows, Ctrl-C, Ctrl-Break and the console's
    /// close, log-off and shutdown events (for these last, tokio's handler holds the
    /// process until the drain ends or Windows' own deadline passes).
    pub(crate) struct Stop {
        #[cfg(unix)]
        term: Option<tokio::signal::unix::Signal>,
        #[cfg(unix)]
        int: Option<tokio::signal::unix::Signal>,
        #[cfg(windows)]
        console: Option<Console>,
    }

    /// SIGHUP (never, where there is none).
    pub(crate) struct Hangup {
        #[cfg(unix)]
        hup: Option<tokio::signal::unix::Signal>,
    }

    #[cfg(windows)]
    struct Console {
        c: tokio::signal::windows::CtrlC,
        brk: tokio::signal::windows::CtrlBreak,
        close: tokio::signal::windows::CtrlClose,
        logoff: tokio::signal::windows::CtrlLogoff,
        shutdown: tokio::signal::windows::CtrlShutdown,
    }

    impl Signals {
        /// Starts watching (inside the runtime). A signal that cannot be watched is
        /// logged, and keeps its default action.
        pub(crate) fn new() -> Self {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                let watch = |kind: SignalKind, name: &str| match signal(kind) {
                    Ok(s) => Some(s),
                    Err(error) => {
                        tracing::warn!(%error, "cannot watch {name}");
                        None
                    }
                };
                Self {
                    stop: Stop {
                        term: watch(SignalKind::terminate(), "SIGTERM"),
                        int: watch(SignalKind::interrupt(), "SIGINT"),
                    },
                    hangup: Hangup {
                        hup: watch(SignalKind::hangup(), "SIGHUP"),
                    },
                }
            }
            #[cfg(windows)]
            {
                use tokio::signal::windows::{
                    ctrl_break, ctrl_c, ctrl_close, ctrl_logoff, ctrl_shutdown,
                };
                let console = (|| {
                    Ok::<_, std::io::Error>(Console {
                        c: ctrl_c()?,
                        brk: ctrl_break()?,
                        close: ctrl_close()?,
                        logoff: ctrl_logoff()?,
                        shutdown: ctrl_shutdown()?,
                    })
                })();
                Self {
                    stop: Stop {
                        console: console
                            .map_err(|error| {
                                tracing::warn!(%error, "cannot watch the console's events");
                            })
                            .ok(),
                    },
                    hangup: Hangup {},
                }
            }
            #[cfg(not(any(unix, windows)))]
            {
                Self {
                    stop: Stop {},
                    hangup: Hangup {},
                }
            }
        }
    }

    impl Stop {
        /// The next stop signal.
        pub(crate) async fn recv(&mut self) {
            #[cfg(unix)]
            {
                tokio::select! {
                    () = recv(&mut self.term) => {}
                    () = recv(&mut self.int) => {}
                }
            }
            #[cfg(windows)]
            match &mut self.console {
                Some(w) => {
                    tokio::select! {
                        _ = w.c.recv() => {}
                        _ = w.brk.recv() => {}
                        _ = w.close.recv() => {}
                        _ = w.logoff.recv() => {}
                        _ = w.shutdown.recv() => {}
                    }
                }
                // The console's events could not be watched: Ctrl-C at least.
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            #[cfg(not(any(unix, windows)))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }

    impl Hangup {
        /// The next SIGHUP.
        pub(crate) async fn recv(&mut self) {
            #[cfg(unix)]
            recv(&mut self.hup).await;
            #[cfg(not(unix))]
            std::future::pending::<()>().await;
        }
    }

    /// The next delivery of a watched signal; never, for one not watched.
    #[cfg(unix)]
    async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
        if let Some(s) = signal
            && s.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await
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
