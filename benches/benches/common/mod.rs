//! Pieces the benches share: on-CPU time of this process, medians, and authorization
//! rules of distinct workloads.
// Each bench includes this module and uses only part of it.
#![allow(dead_code)]

use mesh_core::config::{AuthorizationRule, PathMatch, RouteMatch};

/// On-CPU nanoseconds of every thread of this process (`/proc/self/task/*/schedstat`).
pub(crate) fn cpu_ns() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// The median of `v` (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `n` rules, rule `i` for the workload `client{i}` on the routes under
/// `/api/v1/resource{i}` (GET and POST).
pub(crate) fn workload_rules(n: usize) -> Vec<AuthorizationRule> {
    (0..n)
        .map(|i| AuthorizationRule {
            name: format!("rule-{i}"),
            clients: vec![
                format!("spiffe://example.org/ns/prod/sa/client{i}")
                    .parse()
                    .unwrap(),
            ],
            unauthenticated: false,
            routes: vec![RouteMatch {
                path: Some(PathMatch::Prefix(format!("/api/v1/resource{i}"))),
                methods: vec![http::Method::GET, http::Method::POST],
                ..RouteMatch::default()
            }],
        })
        .collect()
}
