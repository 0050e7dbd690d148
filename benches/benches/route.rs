//! Route selection at 10, 100 and 1,000 routes against a linear first-match scan over the
//! same compiled matches, in the same run. Two shapes: every route on its own hostname
//! (the table's hostname buckets make it one lookup), and every route on one hostname
//! with its own path prefix (the table's index by first path segment makes it one
//! lookup from 16 routes; below, it scans in precedence order). The request selects the
//! last route.
//!
//! Then a whole `Router` call (select, weighted pick among two backends, the clone of
//! the backend, its response future) over 100 routes, against calling the same
//! always-ready backend directly.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::config::{BackendRef, PathMatch, RouteConfig, RouteMatch};
use mesh_tower::matcher::RequestMatch;
use mesh_tower::route::{RouteTable, Router, Routes};
use tower::Service;

fn routes(n: usize, own_hosts: bool) -> Vec<RouteConfig> {
    (0..n)
        .map(|i| RouteConfig {
            name: format!("r{i}"),
            hosts: vec![if own_hosts {
                format!("svc{i}.example.org")
            } else {
                "api.example.org".into()
            }],
            matches: vec![RouteMatch {
                path: Some(PathMatch::Prefix(if own_hosts {
                    "/api".into()
                } else {
                    format!("/svc{i}")
                })),
                ..RouteMatch::default()
            }],
            backends: vec![BackendRef {
                service: format!("svc{i}"),
                weight: 1,
            }],
            retry: None,
            timeout: None,
            fault: None,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for n in [10, 100, 1000] {
        for own_hosts in [true, false] {
            let config = routes(n, own_hosts);
            let table = RouteTable::new(&config).unwrap();
            // The baseline: (host, match) pairs scanned in order, first hit wins.
            let linear: Vec<(String, RequestMatch)> = config
                .iter()
                .map(|r| {
                    (
                        r.hosts[0].clone(),
                        RequestMatch::new(&r.matches[0]).unwrap(),
                    )
                })
                .collect();
            let last = n - 1;
            let uri = if own_hosts {
                format!("http://svc{last}.example.org/api/items")
            } else {
                format!("http://api.example.org/svc{last}/items")
            };
            let req = http::Request::get(uri).body(()).unwrap();
            assert_eq!(table.select(&req).unwrap().route, last);
            let shape = if own_hosts { "hosts" } else { "paths" };
            c.bench_function(&format!("route/{shape}/{n}/table"), |b| {
                b.iter(|| black_box(table.select(black_box(&req)).map(|s| s.route)))
            });
            c.bench_function(&format!("route/{shape}/{n}/linear"), |b| {
                b.iter(|| {
                    let req = black_box(&req);
                    let host = req.uri().host().unwrap_or("");
                    black_box(
                        linear
                            .iter()
                            .position(|(h, m)| h.eq_ignore_ascii_case(host) && m.matches(req)),
                    )
                })
            });
        }
    }
}

fn router(c: &mut Criterion) {
    use futures_util::FutureExt;
    let backend = tower::service_fn(|_req: http::Request<()>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(())))
    });
    let mut config = routes(100, true);
    for r in &mut config {
        r.backends = vec![
            BackendRef {
                service: "stable".into(),
                weight: 95,
            },
            BackendRef {
                service: "canary".into(),
                weight: 5,
            },
        ];
    }
    let mut router = Router::new(
        Routes::builder()
            .backend("stable", backend)
            .backend("canary", backend)
            .routes(config)
            .build()
            .unwrap(),
    );
    let req = || {
        http::Request::get("http://svc99.example.org/api/items")
            .body(())
            .unwrap()
    };
    let mut direct = backend;
    c.bench_function("router/direct", |b| {
        b.iter(|| black_box(direct.call(black_box(req())).now_or_never()))
    });
    c.bench_function("router/100-routes", |b| {
        b.iter(|| black_box(router.call(black_box(req())).now_or_never()))
    });
}

criterion_group!(benches, bench, router);
criterion_main!(benches);
