//! The event log's helpers, on hand-made logs, and its clock under paused time (no
//! sockets involved).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use mesh_test::events::{
    AuthzEvent, BreakerEvent, BreakerTransition, CredentialEvent, Decision, EndpointRef, Recorded,
    RequestEvent,
};
use mesh_test::{Event, EventLog, MockMesh, Outcome};

fn at(index: usize) -> EndpointRef {
    EndpointRef {
        service: Arc::from("users"),
        index,
        addr: SocketAddr::from(([127, 0, 0, 1], 9000 + index as u16)),
    }
}

fn request(index: usize, outcome: Outcome) -> Event {
    Event::Request(RequestEvent {
        endpoint: at(index),
        peer: None,
        method: Method::GET,
        path: "/".into(),
        grpc: false,
        outcome,
    })
}

fn log(events: Vec<Event>) -> EventLog {
    EventLog(
        events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Recorded {
                seq: i as u64,
                at: Duration::from_millis(i as u64),
                event,
            })
            .collect(),
    )
}

#[test]
fn counts_shares_and_order() {
    let error = Outcome::Error {
        status: StatusCode::SERVICE_UNAVAILABLE,
        grpc_code: None,
    };
    let log = log(vec![
        request(0, Outcome::Ok),
        request(1, error.clone()),
        request(1, error.clone()),
        Event::Breaker(BreakerEvent {
            service: Arc::from("users"),
            addr: at(1).addr,
            index: Some(1),
            transition: BreakerTransition::Ejected,
        }),
        request(0, Outcome::Ok),
        request(0, Outcome::Ok),
        Event::Authz(AuthzEvent {
            endpoint: at(0),
            peer: None,
            method: Method::GET,
            path: "/admin".into(),
            decision: Decision::Denied {
                policy: "users".into(),
            },
        }),
        request(3, Outcome::Ok), // an index beyond the count given is ignored by counts
    ]);
    assert_eq!(log.request_counts("users", 3), [3, 2, 0]);
    assert_eq!(log.shares("users", 3), [0.6, 0.4, 0.0]);
    assert_eq!(log.shares("nobody", 2), [0.0, 0.0]);
    assert_eq!(log.ejections("users", 1), 1);
    assert_eq!(log.ejections("users", 0), 0);
    assert_eq!(log.denials("users"), 1);
    assert_eq!(log.count_outcomes("users", |o| *o == error), 2);
    // Nothing reached endpoint 1 after its ejection.
    let ejected =
        |e: &Event| matches!(e, Event::Breaker(b) if b.transition == BreakerTransition::Ejected);
    let to_1 = |e: &Event| matches!(e, Event::Request(r) if r.endpoint.index == 1);
    assert!(log.all_before(to_1, ejected));
    assert!(!log.all_before(
        |e| matches!(e, Event::Request(r) if r.endpoint.index == 0),
        ejected
    ));
    let after = log.since(log.position(ejected).unwrap());
    assert_eq!(after.request_counts("users", 3), [2, 0, 0]);
    assert_eq!(after[0].seq, 3);
    assert_eq!(log.since(100).len(), 0);
}

#[tokio::test(start_paused = true)]
async fn events_are_stamped_with_tokio_time_so_paused_time_shows() {
    let mesh = MockMesh::builder().seed(3).build().unwrap();
    assert_eq!(mesh.seed(), 3);
    let _store = mesh.credentials("web").unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    mesh.rotate_svids().unwrap();
    let log = mesh.events();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].seq, 0);
    assert!(log[0].at >= Duration::from_secs(30), "{:?}", log[0].at);
    assert_eq!(
        log[0].event,
        Event::Credentials(CredentialEvent::SvidsRotated { workloads: 1 })
    );
}
