//! Watches one discovery source and prints every change it emits, the way a balancer would
//! receive them.
//!
//! The source is described by the same TOML as a service's `discovery` key in the mesh
//! configuration:
//!
//! ```text
//! cargo run -p watch-endpoints -- 'kind = "file"
//! path = "endpoints.toml"'
//! cargo run -p watch-endpoints -- 'kind = "dns"
//! host = "localhost"
//! port = 8080'
//! ```
//!
//! Edit the endpoints file while it runs (or change the DNS records) and each `Insert` and
//! `Remove` appears, along with warnings for malformed files and failed lookups, which keep
//! the last good set. Stop it with Ctrl-C.

// A command-line example: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use futures_util::StreamExt;
use mesh_core::config::DiscoveryConfig;
use mesh_core::discover::{self, Change};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Some(spec) = std::env::args().nth(1) else {
        eprintln!(
            "usage: watch-endpoints '<discovery TOML, e.g. kind = \"file\" path = \"eps.toml\">'"
        );
        return ExitCode::from(2);
    };
    let config: DiscoveryConfig = match toml::from_str(&spec) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: invalid discovery config: {e}");
            return ExitCode::from(2);
        }
    };
    let mut changes = match discover::from_config(&config).await {
        Ok(changes) => changes,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(Change::Insert(key, ep))) => {
                    let id = ep.identity().map(ToString::to_string).unwrap_or_else(|| "-".into());
                    let zone = ep.zone().unwrap_or("-");
                    println!("insert {key}  identity={id} zone={zone} weight={}", ep.weight());
                }
                Some(Ok(Change::Remove(key))) => println!("remove {key}"),
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
                None => {
                    println!("(the source ended: a static list emits once)");
                    return ExitCode::SUCCESS;
                }
            },
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        }
    }
}
