//! Composing mesh-tower's layers yourself: our retry, circuit breaker, load measurement and
//! balancer in front of *your own* hyper client, with no `MeshClient`.
//!
//! ```text
//! cargo run -p compose
//! ```
//!
//! Three backends run on 127.0.0.1 (mock endpoints from `mesh-tower`'s `test-util`): one
//! healthy, one that answers 503 to everything, one that answers 429 with
//! `Retry-After: 1`. The application has one plain `hyper_util` client. Each endpoint's
//! service is that client aimed at the endpoint's address, wrapped in the breaker and load
//! layers; the balancer picks among them by power of two choices, and the retry layer on
//! top retries failures (with a budget) and 429s on another endpoint. The stack:
//!
//! ```text
//! RetryLayer                      retries, budget, body replay, 429 elsewhere
//! Balance                         P2C over Load, fed by discovery
//!   per endpoint: BreakerLayer    ejects the 503 backend
//!                 PeakEwmaLayer   RTT, in-flight, 429 penalty
//!                 your hyper client, aimed at the endpoint
//! ```
//!
//! It sends 400 GETs and prints what the caller saw (no failure, no 429) and where the
//! tries went.

// A command-line program: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::Endpoint;
use mesh_core::discover::StaticDiscovery;
use mesh_core::error::BoxError;
use mesh_tower::balance::Balance;
use mesh_tower::breaker::BreakerLayer;
use mesh_tower::load::PeakEwmaLayer;
use mesh_tower::mock::{Behavior, MockEndpoint};
use mesh_tower::retry::{ReplayBody, RetryLayer};
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, BoxError> {
    let backends = [
        MockEndpoint::spawn("healthy", Behavior::default()).await?,
        MockEndpoint::spawn(
            "failing",
            Behavior::failing(StatusCode::SERVICE_UNAVAILABLE),
        )
        .await?,
        MockEndpoint::spawn("limited", Behavior::rate_limited(Some(1))).await?,
    ];

    // The application's own client: nothing of the mesh in it.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let hyper: Client<HttpConnector, ReplayBody> =
        Client::builder(TokioExecutor::new()).build(connector);

    let discovery = StaticDiscovery::new(backends.iter().map(|b| Endpoint::new(b.addr())));
    let breaker = BreakerLayer::default();
    let load = PeakEwmaLayer::new();
    let balance = Balance::builder().service_name("users").build(
        Box::pin(discovery),
        move |endpoint: &Endpoint| {
            let (hyper, addr) = (hyper.clone(), endpoint.addr());
            // The endpoint's service: the application's client, aimed at this endpoint.
            let aimed = tower::service_fn(move |mut req: Request<ReplayBody>| {
                let hyper = hyper.clone();
                async move {
                    let uri: Uri = format!("http://{addr}{}", req.uri().path()).parse()?;
                    *req.uri_mut() = uri;
                    Ok::<_, BoxError>(hyper.request(req).await?)
                }
            });
            Some(
                ServiceBuilder::new()
                    .layer(breaker.clone())
                    .layer(load.clone())
                    .service(aimed),
            )
        },
    );
    let mut client = ServiceBuilder::new()
        .layer(RetryLayer::default())
        .service(balance);

    let (mut ok, mut failed) = (0, 0);
    for _ in 0..400 {
        let req = Request::get("http://users/").body(Empty::<Bytes>::new())?;
        let resp = ServiceExt::<Request<Empty<Bytes>>>::ready(&mut client)
            .await?
            .call(req)
            .await;
        match resp {
            Ok(resp) if resp.status() == StatusCode::OK => {
                resp.into_body().collect().await?;
                ok += 1;
            }
            Ok(resp) => {
                println!("caller saw {}", resp.status());
                failed += 1;
            }
            Err(e) => {
                println!("caller saw an error: {e}");
                failed += 1;
            }
        }
    }
    println!("400 requests: {ok} ok, {failed} failed");
    for b in &backends {
        println!(
            "  {:<8} tries {:>4}   503s {:>3}   429s {:>3}",
            b.name(),
            b.stats().requests(),
            b.stats().errors.load(std::sync::atomic::Ordering::Relaxed),
            b.stats()
                .rate_limited
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    Ok(failed == 0)
}
