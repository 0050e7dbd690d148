//! The authorization decision alone, at 10 and 100 rules: the time `Policy::decide` takes
//! for a request the last rule admits (every rule tried), one the first rule admits, and
//! one no rule admits (denied after trying every rule), against a baseline of matching
//! one compiled route directly.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::SpiffeId;
use mesh_core::config::{AuthorizationPolicy, DefaultAction};
use mesh_tower::authz::Policy;
use mesh_tower::matcher::RequestMatch;

mod common;

use common::workload_rules;

/// `n` rules, each for its own workload and route.
fn policy(n: usize) -> Policy {
    let rules = workload_rules(n);
    Policy::new(
        "bench",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules,
        },
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let single = RequestMatch::new(&workload_rules(1)[0].routes[0]).unwrap();
    let first_req = http::Request::get("/api/v1/resource0/items/42")
        .body(())
        .unwrap();
    c.bench_function("authz/one_route_match", |b| {
        b.iter(|| black_box(single.matches(black_box(&first_req))))
    });
    for n in [10, 100] {
        let p = policy(n);
        let last = n - 1;
        let last_id =
            SpiffeId::new(format!("spiffe://example.org/ns/prod/sa/client{last}")).unwrap();
        let last_req = http::Request::get(format!("/api/v1/resource{last}/items/42"))
            .body(())
            .unwrap();
        let first_id = SpiffeId::new("spiffe://example.org/ns/prod/sa/client0").unwrap();
        let stranger = SpiffeId::new("spiffe://example.org/ns/prod/sa/stranger").unwrap();
        assert_eq!(
            p.decide(Some(&last_id), &last_req).unwrap().rule(),
            Some(format!("rule-{last}").as_str())
        );
        c.bench_function(&format!("authz/{n}_rules/last_rule_allows"), |b| {
            b.iter(|| {
                black_box(
                    p.decide(black_box(Some(&last_id)), black_box(&last_req))
                        .is_ok(),
                )
            })
        });
        c.bench_function(&format!("authz/{n}_rules/first_rule_allows"), |b| {
            b.iter(|| {
                black_box(
                    p.decide(black_box(Some(&first_id)), black_box(&first_req))
                        .is_ok(),
                )
            })
        });
        c.bench_function(&format!("authz/{n}_rules/denied"), |b| {
            b.iter(|| {
                black_box(
                    p.decide(black_box(Some(&stranger)), black_box(&last_req))
                        .is_err(),
                )
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
