//! `mesh-proxy`: the mesh as a standalone proxy, for workloads not written in Rust.
//!
//! The proxy is a thin composition of the mesh crates: inbound listeners (mTLS from peers,
//! authorization, rate limiting, to the local application), outbound listeners (routing,
//! balancing, retries, circuit breaking, mTLS to peers) and an admin listener, configured
//! by one TOML file (see `examples/config/mesh.toml` for every section).
//!
//! Today it provides the `check` command, which loads and validates a configuration file
//! the way the proxy will at start, reporting every error with its key path:
//!
//! ```text
//! mesh-proxy check mesh.toml           # validate; exit 0 when valid, 1 when not
//! mesh-proxy check mesh.toml --print   # ... and print the effective config, defaults filled in
//! ```
//!
//! Serving traffic is tracked on the project's proxy issue.

// The command line's output is its interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, print } => check(&config, print),
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
