//! gRPC retries (gRFC A6) and deadlines through the retry layer, over `service_fn`s that
//! record what each try received.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use mesh_core::error::BoxError;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::{ReplayBody, RetryBudget, RetryLayer, RetryPolicy};
use crate::timeout::{Deadline, DeadlineExceeded, TimeoutLayer};

/// What one try received: its headers, body and when it started.
#[derive(Debug)]
struct Try {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// How the scripted server answers try `n` (from 0).
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Trailers-only: `grpc-status` (and pushback, if given) in the only header block.
    TrailersOnly(u16, Option<&'static str>),
    /// Response headers without a status (committed); the status comes in trailers.
    Headers,
    Ok,
    /// A trailers-only answer a mesh proxy made itself (`x-mesh-error`), with this code.
    Mesh(u16),
    /// An answer that is not gRPC's: this HTTP status, plain text.
    Http(u16),
}

fn grpc_response(answer: Answer) -> Response<Full<Bytes>> {
    let mut resp = Response::builder()
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    match answer {
        Answer::TrailersOnly(code, pushback) => {
            resp.headers_mut().insert("grpc-status", code.into());
            if let Some(p) = pushback {
                resp.headers_mut()
                    .insert("grpc-retry-pushback-ms", p.parse().unwrap());
            }
        }
        Answer::Headers => {}
        Answer::Ok => {
            resp.headers_mut().insert("grpc-status", 0.into());
        }
        Answer::Mesh(code) => {
            resp.headers_mut().insert("grpc-status", code.into());
            resp.headers_mut()
                .insert(crate::body::MESH_ERROR, "true".parse().unwrap());
        }
        Answer::Http(status) => {
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            resp.headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
        }
    }
    resp
}

type Tries = Arc<Mutex<Vec<Try>>>;

/// A retrying client over a server answering by `script` (the last answer repeats),
/// taking `latency` per try.
fn client<B>(
    script: Vec<Answer>,
    latency: Duration,
    max_retries: u32,
) -> (
    impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = BoxError>,
    Tries,
)
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    client_with(script, latency, move |p| p.max_retries = max_retries)
}

/// The default policy with a fixed 10 ms back-off.
fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        backoff: crate::backoff::Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
            0.0,
        )
        .unwrap(),
        ..RetryPolicy::default()
    }
}

/// [`client`] with the default policy (back-off 10 ms) as `tune` leaves it.
fn client_with<B>(
    script: Vec<Answer>,
    latency: Duration,
    tune: impl FnOnce(&mut RetryPolicy),
) -> (
    impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = BoxError>,
    Tries,
)
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let tries: Tries = Arc::default();
    let seen = tries.clone();
    let mut policy = fast_policy();
    tune(&mut policy);
    let svc = ServiceBuilder::new()
        .map_response(|r: Response<crate::timeout::ResponseBody<_>>| {
            r.map(crate::timeout::ResponseBody::into_inner)
        })
        .layer(TimeoutLayer::request(None))
        .layer(RetryLayer::new(
            policy,
            RetryBudget::new(1.0, 1000, Duration::from_secs(10)),
        ))
        .service(tower::service_fn(move |req: Request<ReplayBody>| {
            let seen = seen.clone();
            let script = script.clone();
            async move {
                let at = Instant::now();
                let (parts, body) = req.into_parts();
                let body = body.collect().await?.to_bytes();
                let n = {
                    let mut tries = seen.lock().unwrap();
                    tries.push(Try {
                        headers: parts.headers,
                        body,
                        at,
                    });
                    tries.len() - 1
                };
                tokio::time::sleep(latency).await;
                let answer = script[n.min(script.len() - 1)];
                Ok::<_, BoxError>(grpc_response(answer))
            }
        }));
    (svc, tries)
}

fn call(timeout: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::post("http://users/users.v1.Users/Get")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        req = req.header("grpc-timeout", t);
    }
    req.body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn unavailable_posts_are_retried_with_the_attempt_count_and_at_most_five_attempts() {
    let (svc, tries) = client(vec![Answer::TrailersOnly(14, None)], Duration::ZERO, 10);
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "14");
    let tries = tries.lock().unwrap();
    assert_eq!(
        tries.len(),
        5,
        "A6 caps attempts at 5, whatever max_retries says"
    );
    let attempts: Vec<Option<&str>> = tries
        .iter()
        .map(|t| {
            t.headers
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap())
        })
        .collect();
    assert_eq!(attempts, [None, Some("1"), Some("2"), Some("3"), Some("4")]);
    assert!(tries.iter().all(|t| t.body == "\0\0\0\0\x02hi"));
}

#[tokio::test(start_paused = true)]
async fn codes_not_in_the_policy_and_committed_calls_are_not_retried() {
    // INTERNAL (13) is not retryable by default.
    let (svc, tries) = client(vec![Answer::TrailersOnly(13, None)], Duration::ZERO, 2);
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "13");
    assert_eq!(tries.lock().unwrap().len(), 1);
    // Response headers without a status: the call is committed, whatever its trailers.
    let (svc, tries) = client(vec![Answer::Headers], Duration::ZERO, 2);
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert!(resp.headers().get("grpc-status").is_none());
    assert_eq!(tries.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn pushback_is_the_delay_and_a_negative_one_forbids_retrying() {
    let (svc, tries) = client(
        vec![Answer::TrailersOnly(14, Some("300")), Answer::Ok],
        Duration::ZERO,
        2,
    );
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "0");
    {
        let tries = tries.lock().unwrap();
        assert_eq!(tries.len(), 2);
        assert_eq!(
            tries[1].at - tries[0].at,
            Duration::from_millis(300),
            "exactly the pushback, not the 10 ms back-off"
        );
    }

    let (svc, tries) = client(
        vec![Answer::TrailersOnly(14, Some("-1")), Answer::Ok],
        Duration::ZERO,
        2,
    );
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(tries.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn each_try_carries_the_time_left_and_nothing_is_sent_past_the_deadline() {
    // Each try takes 400 ms and fails; the call has 1 s.
    let (svc, tries) = client(
        vec![Answer::TrailersOnly(14, Some("100"))],
        Duration::from_millis(400),
        4,
    );
    let started = Instant::now();
    let resp = svc.oneshot(call(Some("1S"))).await.unwrap();
    let tries = tries.lock().unwrap();
    let left: Vec<Duration> = tries
        .iter()
        .map(|t| mesh_core::classify::grpc::parse_timeout(&t.headers["grpc-timeout"]).unwrap())
        .collect();
    // Tries at 0 and 500 ms (400 + 100 pushback); a third would start at 1 s, the
    // deadline: not made, and the last answer is the caller's.
    assert_eq!(left, [Duration::from_secs(1), Duration::from_millis(500)]);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(started.elapsed(), Duration::from_millis(900));
}

#[tokio::test(start_paused = true)]
async fn an_expired_deadline_fails_without_sending() {
    let (svc, tries) = client(vec![Answer::Ok], Duration::ZERO, 2);
    let mut req = call(None);
    req.extensions_mut().insert(Deadline(Instant::now()));
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(
        mesh_core::error::is_caused_by::<DeadlineExceeded>(err.as_ref()),
        "{err}"
    );
    assert!(tries.lock().unwrap().is_empty(), "nothing was sent");
}

#[tokio::test(start_paused = true)]
async fn streamed_bodies_of_unknown_size_are_replayed_to_the_next_try() {
    let (svc, tries) = client(
        vec![Answer::TrailersOnly(14, None), Answer::Ok],
        Duration::ZERO,
        2,
    );
    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> =
        [&b"\0\0\0\0\x01a"[..], b"\0\0\0\0\x01b"]
            .into_iter()
            .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c))))
            .collect();
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let req = Request::post("http://users/users.v1.Users/Stream")
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "0");
    let tries = tries.lock().unwrap();
    assert_eq!(tries.len(), 2);
    assert_eq!(tries[0].body, tries[1].body);
    assert_eq!(tries[1].body, "\0\0\0\0\x01a\0\0\0\0\x01b");
}

#[tokio::test(start_paused = true)]
async fn a_shorter_carried_deadline_ends_the_request() {
    // The request timeout layer has none of its own; the caller's deadline bounds it.
    let (svc, _tries) = client(vec![Answer::Ok], Duration::from_secs(5), 0);
    let mut req = Request::post("http://users/x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(Deadline(Instant::now() + Duration::from_millis(250)));
    let started = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(err.is::<crate::timeout::RequestTimeout>(), "{err}");
    assert_eq!(started.elapsed(), Duration::from_millis(250));
}

/// A6: the policy's codes say what is retried, whatever class the classification gives
/// them: ABORTED (a success to the breakers) is retried when the policy names it, and a
/// RESOURCE_EXHAUSTED named there waits for its pushback.
#[tokio::test(start_paused = true)]
async fn the_policys_codes_decide_whatever_their_class() {
    use mesh_core::classify::grpc::{Code, CodeSet};
    let (svc, tries) = client_with(
        vec![Answer::TrailersOnly(10, None), Answer::Ok],
        Duration::ZERO,
        |p| p.grpc_codes = CodeSet::of(&[Code::Unavailable, Code::Aborted]),
    );
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "0");
    assert_eq!(tries.lock().unwrap().len(), 2);
    let (svc, tries) = client_with(
        vec![Answer::TrailersOnly(8, Some("300")), Answer::Ok],
        Duration::ZERO,
        |p| {
            p.grpc_codes = CodeSet::of(&[Code::Unavailable, Code::ResourceExhausted]);
            p.retry_rate_limited_elsewhere = false;
        },
    );
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "0");
    let tries = tries.lock().unwrap();
    assert_eq!(tries.len(), 2);
    assert_eq!(tries[1].at - tries[0].at, Duration::from_millis(300));
}

/// An application's RESOURCE_EXHAUSTED is not retried elsewhere unless the policy names
/// the code (the call may have done its work); one a mesh proxy's limiter made is, since
/// no application saw the call.
#[tokio::test(start_paused = true)]
async fn resource_exhausted_goes_elsewhere_only_when_safe() {
    let (svc, tries) = client_with(
        vec![Answer::TrailersOnly(8, Some("100")), Answer::Ok],
        Duration::ZERO,
        |_| {},
    );
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "8");
    assert_eq!(tries.lock().unwrap().len(), 1);
    let (svc, tries) = client_with(vec![Answer::Mesh(8), Answer::Ok], Duration::ZERO, |_| {});
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "0");
    assert_eq!(tries.lock().unwrap().len(), 2);
}

/// An answer that is not gRPC's counts by the code gRPC clients map its status to: a
/// 500 is UNKNOWN (not retried by default), a 503 UNAVAILABLE (retried).
#[tokio::test(start_paused = true)]
async fn http_answers_to_calls_are_judged_by_their_grpc_code() {
    let (svc, tries) = client(vec![Answer::Http(500), Answer::Ok], Duration::ZERO, 2);
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(tries.lock().unwrap().len(), 1);
    let (svc, tries) = client(vec![Answer::Http(503), Answer::Ok], Duration::ZERO, 2);
    let resp = svc.oneshot(call(None)).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "0");
    assert_eq!(tries.lock().unwrap().len(), 2);
}

/// A call whose try timed out (or broke) may have run on the server: it counts as
/// UNAVAILABLE and is retried when the policy names that code (A6); a policy naming no
/// code sends it once.
#[tokio::test(start_paused = true)]
async fn calls_that_may_have_run_are_retried_only_when_the_policy_names_unavailable() {
    for (codes, expected) in [
        (RetryPolicy::default().grpc_codes, 3),
        (mesh_core::classify::grpc::CodeSet::of(&[]), 1),
    ] {
        let tries = Arc::new(Mutex::new(0));
        let seen = tries.clone();
        let policy = RetryPolicy {
            grpc_codes: codes,
            ..fast_policy()
        };
        let svc = ServiceBuilder::new()
            .layer(RetryLayer::new(
                policy,
                RetryBudget::new(1.0, 1000, Duration::from_secs(10)),
            ))
            .layer(TimeoutLayer::per_try(Some(Duration::from_millis(100))))
            .service(tower::service_fn(move |_req: Request<ReplayBody>| {
                *seen.lock().unwrap() += 1;
                async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, BoxError>(grpc_response(Answer::Ok))
                }
            }));
        let err = svc.oneshot(call(None)).await.unwrap_err();
        assert!(
            mesh_core::error::is_caused_by::<crate::timeout::TryTimeout>(err.as_ref()),
            "{err}"
        );
        assert_eq!(*tries.lock().unwrap(), expected, "{codes:?}");
    }
}

/// A rate-limited answer retried elsewhere whose try there reached no application (the
/// pool had no room for it): the caller gets the rate-limited answer, with its pushback.
/// One whose try there may have run gets that try's error: the kept answer says no
/// application saw the call, which would no longer be true.
#[tokio::test(start_paused = true)]
async fn the_kept_answer_is_returned_only_when_the_try_elsewhere_reached_no_application() {
    for unsent in [true, false] {
        let tries = Arc::new(Mutex::new(0));
        let seen = tries.clone();
        let svc = ServiceBuilder::new()
            .layer(RetryLayer::new(
                RetryPolicy::default(),
                RetryBudget::new(1.0, 1000, Duration::from_secs(10)),
            ))
            .service(tower::service_fn(move |req: Request<ReplayBody>| {
                let n = {
                    let mut n = seen.lock().unwrap();
                    *n += 1;
                    *n
                };
                async move {
                    if n == 1 {
                        return Ok::<_, BoxError>(grpc_response(Answer::Mesh(8)));
                    }
                    assert!(req.extensions().get::<super::Elsewhere>().is_some());
                    Err(if unsent {
                        crate::connect::PoolOverflow {
                            addr: "10.0.0.2:80".parse().unwrap(),
                            connections: 1,
                            pending: 0,
                        }
                        .into()
                    } else {
                        "connection reset mid-call".into()
                    })
                }
            }));
        let result = svc.oneshot(call(None)).await;
        if unsent {
            let resp = result.unwrap();
            assert_eq!(resp.headers()["grpc-status"], "8");
            assert!(resp.headers().contains_key(crate::body::MESH_ERROR));
        } else {
            assert_eq!(result.unwrap_err().to_string(), "connection reset mid-call");
        }
        assert_eq!(*tries.lock().unwrap(), 2);
    }
}
