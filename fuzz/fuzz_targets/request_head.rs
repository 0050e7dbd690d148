//! A request head as a client may send it, through the checks and rewrites every request
//! gets: `server::host_problem` (the server's 400s), `forward::strip_hop_by_hop` and the
//! `ToMesh` layer (the hop to a peer proxy as HTTP/2). Never a panic, and:
//!
//! - `strip_hop_by_hop` does what a plain reference does: when the head has any of
//!   `Connection`, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `TE`,
//!   those go, and so does every field `Connection` names (split at `,`, trimmed of
//!   spaces and tabs) but `Host`, `Content-Length`, `Trailer` and `TE`; a
//!   `Content-Length` beside a `Transfer-Encoding` goes; `TE` becomes exactly `trailers`
//!   when any of its fields lists it, else goes. Every other field keeps its values in
//!   their order; running it again changes nothing.
//! - A request the server takes has a `Host` that is empty or an `http` authority, and
//!   an authority without userinfo.
//! - `ToMesh` sends HTTP/2 without a connection-specific field, and an HTTP/1.x request
//!   the server took keeps the host its client named: as the URI's authority, or as its
//!   `Host` when that cannot be one.
//!
//! The input is lines: the first `V METHOD URI` (`V`: `0` HTTP/1.0, `2` HTTP/2, `9`
//! HTTP/0.9, else HTTP/1.1), then header fields `name:value` (lines that are none are
//! skipped).
#![no_main]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};
use libfuzzer_sys::fuzz_target;
use mesh_tower::forward::{ToMeshLayer, strip_hop_by_hop};
use mesh_tower::server::host_problem;
use tower::{Layer, Service};

const MAX_FIELDS: usize = 16;

/// Always removed, when present, by `strip_hop_by_hop`.
const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

type Fields = BTreeMap<String, Vec<Vec<u8>>>;

fuzz_target!(|data: &[u8]| {
    let Some(req) = parse(data) else {
        return;
    };

    // strip_hop_by_hop against the reference.
    let mut stripped = req.headers().clone();
    strip_hop_by_hop(&mut stripped);
    assert_eq!(fields(&stripped), reference(req.headers()), "{req:?}");
    let mut again = stripped.clone();
    strip_hop_by_hop(&mut again);
    assert_eq!(fields(&again), fields(&stripped), "idempotent");

    // The server's checks.
    let problem = host_problem(&req);
    let host = req.headers().get(header::HOST).cloned();
    if problem.is_none() {
        if let Some(host) = &host
            && !host.is_empty()
        {
            assert!(
                http::uri::Authority::try_from(host.as_bytes()).is_ok(),
                "a Host taken that is no authority: {host:?}"
            );
        }
        if let Some(authority) = req.uri().authority() {
            assert!(!authority.as_str().contains('@'), "{authority}");
        }
    }

    // The hop to a peer.
    let version = req.version();
    let uri = req.uri().clone();
    let sent = to_mesh(req);
    assert_eq!(sent.version(), Version::HTTP_2);
    for name in CONNECTION_SPECIFIC {
        assert!(!sent.headers().contains_key(name), "{name} sent: {sent:?}");
    }
    let te: Vec<&HeaderValue> = sent.headers().get_all(header::TE).iter().collect();
    assert!(te.is_empty() || te == ["trailers"], "TE sent: {te:?}");
    if problem.is_none()
        && version != Version::HTTP_2
        && uri.authority().is_none()
        && let Some(host) = host
    {
        if host.is_empty() {
            assert_eq!(sent.headers().get(header::HOST), Some(&host));
            assert_eq!(sent.uri(), &uri);
        } else {
            assert_eq!(
                sent.uri().authority().map(|a| a.as_str().as_bytes()),
                Some(host.as_bytes()),
                "the host named: {sent:?}"
            );
            assert!(!sent.headers().contains_key(header::HOST));
        }
    }
});

fn parse(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|&b| b == b'\n');
    let first = lines.next()?;
    let (&v, line) = first.split_first()?;
    let mut parts = line.splitn(2, |&b| b == b' ');
    let method = parts.next()?;
    let uri = parts.next()?;
    let version = match v {
        b'0' => Version::HTTP_10,
        b'2' => Version::HTTP_2,
        b'9' => Version::HTTP_09,
        _ => Version::HTTP_11,
    };
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(version)
        .body(())
        .ok()?;
    for line in lines.take(MAX_FIELDS) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        req.headers_mut().append(name, value);
    }
    Some(req)
}

/// Each field's values, in order.
fn fields(headers: &HeaderMap) -> Fields {
    let mut out = Fields::new();
    for (name, value) in headers {
        out.entry(name.as_str().to_owned())
            .or_default()
            .push(value.as_bytes().to_vec());
    }
    out
}

/// What `strip_hop_by_hop` leaves of `headers` (see the top of this file).
fn reference(headers: &HeaderMap) -> Fields {
    let mut out = fields(headers);
    let specific = |name: &str| CONNECTION_SPECIFIC.contains(&name) || name == "te";
    if !out.keys().any(|name| specific(name)) {
        return out;
    }
    let kept = ["host", "content-length", "trailer", "te"];
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(trim(token))
                && !kept.contains(&name.as_str())
            {
                out.remove(name.as_str());
            }
        }
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        out.remove("content-length");
    }
    for name in CONNECTION_SPECIFIC {
        out.remove(name);
    }
    if let Some(te) = out.remove("te") {
        let trailers = te.iter().any(|v| {
            v.split(|&b| b == b',')
                .any(|m| trim(m).eq_ignore_ascii_case(b"trailers"))
        });
        if trailers {
            out.insert("te".to_owned(), vec![b"trailers".to_vec()]);
        }
    }
    out
}

/// The request `ToMesh` sends on.
fn to_mesh(req: Request<()>) -> Request<()> {
    let mut svc = ToMeshLayer::new().layer(tower::service_fn(|req: Request<()>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(req))
    }));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    match pin!(svc.call(req)).poll(&mut cx) {
        Poll::Ready(Ok(sent)) => sent,
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => panic!("a ready service's answer is pending"),
    }
}

/// `s` without spaces and tabs at either end.
fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}
