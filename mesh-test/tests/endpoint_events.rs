//! What the endpoints log for requests cut short, refused, or answered by tonic itself;
//! how services are declared and grown; and how clients are seeded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use mesh_core::config::{AuthorizationPolicy, ServiceConfig};
use mesh_test::events::{Decision, RequestEvent};
use mesh_test::{Event, EventLog, Latency, MockMesh, Outcome, Script};
use mesh_tower::decision::Event as Decided;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The mesh's log once `done` holds of it (the endpoints log as their server notices),
/// or after 5 s.
async fn events_once(mesh: &MockMesh, done: impl Fn(&EventLog) -> bool) -> EventLog {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = mesh.events();
        if done(&log) || tokio::time::Instant::now() >= until {
            return log;
        }
        tokio::time::sleep(ms(20)).await;
    }
}

fn requests(log: &EventLog) -> Vec<RequestEvent> {
    log.requests("users").cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_timed_out_is_logged_as_cancelled() {
    let mesh = MockMesh::builder().seed(1).build().unwrap();
    let users = mesh
        .service("users")
        .script(Script::latency(ms(500)))
        .spawn()
        .await
        .unwrap();
    let config: ServiceConfig = toml::from_str(
        "discovery = { kind = \"static\", endpoints = [] }\n\
         timeout = { per_try = \"50ms\" }\n\
         retry = { max_retries = 0 }\n",
    )
    .unwrap();
    let client = mesh
        .client_builder_from_config(&users, &config)
        .unwrap()
        .build()
        .unwrap();
    let answer = client.send(common::get()).await;
    assert!(answer.is_err(), "the try should time out: {answer:?}");
    let log = events_once(&mesh, |log| log.requests("users").count() > 0).await;
    let seen = requests(&log);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].outcome, Outcome::Cancelled);
    assert_eq!(seen[0].path, "/");
    // Nothing more arrives once the 500 ms would have passed.
    tokio::time::sleep(ms(600)).await;
    assert_eq!(mesh.events().requests("users").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_decision_is_logged_when_made() {
    let mesh = MockMesh::builder().seed(2).build().unwrap();
    let policy: AuthorizationPolicy = toml::from_str("default = \"allow\"").unwrap();
    let users = mesh.service("users").policy(policy).spawn().await.unwrap();
    let client = mesh.client(&users).unwrap();

    // Answered: the decision comes before the request's own event.
    let resp = client.send(common::get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let log = mesh.events();
    let authz = log.position(|e| matches!(e, Event::Authz(_))).unwrap();
    let request = log.position(|e| matches!(e, Event::Request(_))).unwrap();
    assert!(authz < request, "{log:#?}");

    // Hanging, then given up on: its decision is logged all the same, at once.
    users.set_script(Script::hanging());
    let mark = mesh.events().len();
    let gave_up = tokio::time::timeout(ms(300), client.send(common::get())).await;
    assert!(gave_up.is_err(), "a hanging endpoint answered");
    let log = mesh.events().since(mark);
    let decisions: Vec<_> = log.authz("users").map(|a| a.decision.clone()).collect();
    assert_eq!(
        decisions,
        [Decision::Allowed {
            policy: "users".into(),
            rule: None,
            audit: false
        }],
        "{log:#?}"
    );
    assert_eq!(log.count_outcomes("users", |o| *o == Outcome::Hung), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_to_a_method_echo_lacks_is_logged_as_unimplemented() {
    let mesh = MockMesh::builder().seed(3).build().unwrap();
    let users = mesh.service("users").spawn().await.unwrap();
    let client = mesh.client(&users).unwrap();
    // An empty message, framed: not compressed, length 0.
    let req = http::Request::post("http://users/mesh.Nowhere/Call")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "12");
    let _ = resp.into_body().collect().await;
    let seen = requests(&mesh.events());
    assert!(!seen.is_empty());
    for r in &seen {
        assert!(r.grpc);
        assert_eq!(
            r.outcome,
            Outcome::Error {
                status: StatusCode::OK,
                grpc_code: Some(12)
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_scripts_follow_one_rule() {
    let mesh = MockMesh::builder().seed(4).build().unwrap();
    let (a, b) = (Script::latency(ms(1)), Script::latency(ms(2)));
    let scripts = |svc: &mesh_test::MockService| -> Vec<Script> {
        svc.endpoints().iter().map(|e| e.script()).collect()
    };
    // The count from `endpoints`, the last script repeating beyond the scripts; in
    // either order.
    for svc in [
        mesh.service("one")
            .endpoints(3)
            .scripts([a.clone(), b.clone()]),
        mesh.service("two")
            .scripts([a.clone(), b.clone()])
            .endpoints(3),
    ] {
        let svc = svc.spawn().await.unwrap();
        assert_eq!(scripts(&svc), [a.clone(), b.clone(), b.clone()]);
    }
    // Without it, one endpoint per script.
    let svc = mesh
        .service("three")
        .scripts([a.clone(), b.clone()])
        .spawn()
        .await
        .unwrap();
    assert_eq!(scripts(&svc), [a.clone(), b.clone()]);
    // `script` is `scripts([script])`: every endpoint, however many.
    let svc = mesh
        .service("four")
        .endpoints(2)
        .script(b.clone())
        .spawn()
        .await
        .unwrap();
    assert_eq!(scripts(&svc), [b.clone(), b.clone()]);
    // Fewer endpoints than scripts: the first ones.
    let svc = mesh
        .service("five")
        .scripts([a.clone(), b.clone()])
        .endpoints(1)
        .spawn()
        .await
        .unwrap();
    assert_eq!(scripts(&svc), std::slice::from_ref(&a));
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_additions_get_distinct_indexes() {
    let mesh = MockMesh::builder().seed(5).build().unwrap();
    let users = mesh.service("users").spawn().await.unwrap();
    let added = join_all((0..4).map(|_| users.add_endpoint(Script::default()))).await;
    let indexes: Vec<usize> = added.into_iter().map(|e| e.unwrap().index()).collect();
    assert_eq!(indexes, [1, 2, 3, 4]);
    assert_eq!(users.len(), 5);
    for i in 0..5 {
        assert_eq!(users.endpoint(i).unwrap().index(), i);
    }
    let addrs: BTreeSet<_> = users.endpoints().iter().map(|e| e.addr()).collect();
    assert_eq!(addrs.len(), 5);
}

/// The endpoint pairs the balancer drew, in order, from the decisions since `mark`.
fn candidates(mesh: &MockMesh, mark: u64) -> Vec<String> {
    mesh.decisions()
        .snapshot()
        .into_iter()
        .filter(|d| d.seq >= mark)
        .filter_map(|d| match d.event {
            Decided::Pick(pick) => {
                // The pair as drawn; which of the two won depends on their loads.
                let mut pair = vec![pick.winner.addr.to_string()];
                pair.extend(pick.other.map(|o| o.addr.to_string()));
                pair.sort();
                Some(pair.join(" "))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_of_a_service_draws_its_own_picks() {
    let mesh = MockMesh::builder().seed(6).build().unwrap();
    let users = mesh
        .service("users")
        .endpoints(4)
        .script(Script::default().with_latency(Latency::Fixed(ms(1))))
        .spawn()
        .await
        .unwrap();
    let mut drawn = Vec::new();
    for _ in 0..2 {
        let mark = mesh.decisions().snapshot().last().map_or(0, |d| d.seq + 1);
        let client = mesh.client(&users).unwrap();
        for _ in 0..30 {
            let resp = client.send(common::get()).await.unwrap();
            let _ = resp.into_body().collect().await;
        }
        drawn.push(candidates(&mesh, mark));
    }
    assert!(drawn[0].len() >= 30, "{:?}", drawn[0]);
    assert_ne!(drawn[0], drawn[1], "two clients drew the same picks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_metrics_can_be_read_without_replacing_the_mesh_registry() {
    let mesh = MockMesh::builder().seed(7).build().unwrap();
    let users = mesh.service("users").spawn().await.unwrap();
    let client = mesh.client(&users).unwrap();
    let resp = client.send(common::get()).await.unwrap();
    let _ = resp.into_body().collect().await;
    let texts = users.client_metrics();
    assert_eq!(texts.len(), 1);
    assert!(
        texts[0].contains("mesh_client_responses_total{"),
        "{}",
        texts[0]
    );
}
