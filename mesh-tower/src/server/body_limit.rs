//! The server's own checks of a request, before authorization sees it: a `Host` it may
//! act on, and a declared body within the server's bound.

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::Body;
use mesh_core::classify::grpc::Code;
use tower_service::Service;

use crate::body::{ResponseBody, ResponseFuture, grpc_answer, text_answer};

/// Answers 400 to a request whose `Host` a server must refuse ([`host_problem`]), 413 to
/// one whose declared size (`Content-Length`, as hyper read it) exceeds `max`; passes
/// every other request on. A gRPC call gets a trailers-only status instead: `INTERNAL`
/// for the first (what a gRPC client makes of a 400), `RESOURCE_EXHAUSTED` for the
/// second (what gRPC servers answer a message over their bound with).
#[derive(Clone, Debug)]
pub(super) struct BodyLimit<S> {
    pub(super) inner: S,
    pub(super) max: Option<u64>,
}

impl<S, B, RB> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    B: Body,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(problem) = host_problem(&req) {
            tracing::debug!(problem, "request refused: 400");
            let mut response = if mesh_core::classify::is_grpc(req.headers()) {
                grpc_answer(Code::Internal as u16, problem)
            } else {
                text_answer(StatusCode::BAD_REQUEST, format!("bad request: {problem}\n"))
            };
            if req.version() != Version::HTTP_2 {
                // Its body is not read: the connection cannot carry another request.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return ResponseFuture::local(response);
        }
        let declared = req.body().size_hint().exact();
        if let (Some(max), Some(size)) = (self.max, declared)
            && size > max
        {
            tracing::debug!(size, max, "request body over the bound");
            let mut response = if mesh_core::classify::is_grpc(req.headers()) {
                grpc_answer(
                    Code::ResourceExhausted as u16,
                    "request body over the server's limit",
                )
            } else {
                text_answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body of {size} bytes exceeds the limit of {max}\n"),
                )
            };
            let headers = response.headers_mut();
            // The body is not read: the connection cannot carry another request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            return ResponseFuture::local(response);
        }
        ResponseFuture::inner(self.inner.call(req))
    }
}

/// Why a server must refuse `req` for its `Host` or authority, if it must: more than one
/// `Host` field, none on an HTTP/1.1 request, or one that is not `host[:port]` (RFC 9112
/// §3.2: a 400 for each; an absolute-form request without `Host` is let through, its
/// target naming the host as a proxy reads it anyway, as hyper's low-level client sends
/// them), or userinfo in the request's authority (RFC 9113 §8.3.1 forbids
/// it in `:authority`; RFC 9110 §4.2.4 has recipients treat it as an error). A `Host` of
/// `b.example:1@admin.internal` would otherwise be routed by one name (`b.example`) and
/// served by another (`admin.internal`, once it became a URI's authority). Also a target
/// that is no path (RFC 9112 §3.2.1, RFC 9113 §8.3.1: it starts with `/`, or is `*` for
/// OPTIONS only), and an extended CONNECT for `h2c` or for more than one protocol.
///
/// Exposed for the fuzz targets in `fuzz/`; not a stable API.
#[doc(hidden)]
pub fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Some("more than one Host field"),
        (None, _) if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
            return Some("an HTTP/1.1 request without a Host field");
        }
        (Some(host), None) if !host.is_empty() && !is_host_port(host.as_bytes()) => {
            return Some("a Host that is not host[:port]");
        }
        _ => {}
    }
    if req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Some("userinfo in the request's authority");
    }
    // Every usual request has a path and is no CONNECT: the rest is looked at out of line.
    if req.method() == http::Method::CONNECT
        || req
            .uri()
            .path_and_query()
            .is_some_and(|target| !target.as_str().starts_with('/'))
    {
        return target_problem(req);
    }
    None
}

/// [`host_problem`]'s part for the unusual targets: a CONNECT, a target that does not
/// start with `/`.
#[cold]
#[inline(never)]
fn target_problem<B>(req: &Request<B>) -> Option<&'static str> {
    // A target in origin form must be a path (or `*` for OPTIONS): hyper and h2 take one
    // that starts with `?` (an HTTP/2 `:path` of `?a`, an HTTP/1.1 `GET ?a`), which would
    // go on as a request line no HTTP/1.1 server need read. An absolute-form target with
    // an empty path is fine: it goes on as `/` (or `*` for OPTIONS).
    if let Some(target) = req
        .uri()
        .path_and_query()
        .map(http::uri::PathAndQuery::as_str)
        && if target == "*" {
            req.method() != http::Method::OPTIONS
        } else {
            // HTTP/2's `:path` is never empty (RFC 9113 §8.3.1), with an authority too.
            (req.uri().authority().is_none() || req.version() == Version::HTTP_2)
                && !target.starts_with('/')
        }
    {
        return Some("a request target that is neither a path nor * for OPTIONS");
    }
    // An extended CONNECT (RFC 8441) stands for an HTTP/1.1 upgrade: its `:protocol` must
    // be one protocol a GET with `Upgrade` could ask for, never `h2c` (which would hand
    // the caller an HTTP/2 connection to the application past the mesh's per-request
    // checks) nor a list.
    if req.method() == http::Method::CONNECT
        && let Some(protocol) = req.extensions().get::<hyper::ext::Protocol>()
        && (protocol.as_str().eq_ignore_ascii_case("h2c")
            || protocol.as_str().is_empty()
            || !protocol.as_str().bytes().all(is_protocol_byte))
    {
        return Some("an extended CONNECT whose :protocol is not one protocol other than h2c");
    }
    None
}

/// A byte of an upgrade protocol (RFC 9110 §7.8: a token, with `/` before its version).
fn is_protocol_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)
}

/// The bytes a registered name takes (RFC 3986 §3.2.2: unreserved and sub-delimiters;
/// `%` escapes are refused in names and checked apart in IP literals).
static NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// Whether `value` is `host[:port]` (RFC 9110 §7.2, RFC 3986 §3.2.2): an IP literal in
/// brackets (checked for its characters and at most 8 colons, not parsed), or a name of
/// unreserved and sub-delimiter characters, then an optional port of at most 65535 (it
/// may be empty). One pass, no allocation: every request with a `Host` is checked.
///
/// A name may not be percent-encoded, though RFC 3986 allows it: `http::uri::Authority`
/// refuses one (so the name could not travel as an HTTP/2 `:authority`, and the
/// application would be given another), and clients send international names as
/// punycode (`xn--caf-dma.example`). Nor may a literal have more than 8 colons, which
/// `Authority` refuses too: every `Host` taken here is an authority.
fn is_host_port(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        Some(b'[') => {
            let Some(close) = value.iter().position(|&b| b == b']') else {
                return false;
            };
            // IPv6 (with a zone, `%25eth0`, RFC 6874) or IPvFuture (`v1.x`): the bytes a
            // name takes, `:`, and escapes.
            let literal = &value[1..close];
            if literal.is_empty()
                || literal.iter().filter(|&&b| b == b':').count() > 8
                || !literal.iter().enumerate().all(|(i, &b)| {
                    NAME_BYTES[usize::from(b)]
                        || b == b':'
                        || (b == b'%'
                            && literal
                                .get(i + 1..i + 3)
                                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)))
                })
            {
                return false;
            }
            match &value[close + 1..] {
                [] => return true,
                [b':', port @ ..] => (&value[..=close], port),
                _ => return false,
            }
        }
        _ => match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[][..]),
        },
    };
    let name_ok = host.first() == Some(&b'[')
        || (!host.is_empty() && host.iter().all(|&b| NAME_BYTES[usize::from(b)]));
    let port_ok = port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65_535;
    name_ok && port_ok
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(version: Version, uri: &str, hosts: &[&[u8]]) -> Request<()> {
        let mut req = Request::builder().version(version).uri(uri);
        for host in hosts {
            req = req.header(header::HOST, HeaderValue::from_bytes(host).unwrap());
        }
        req.body(()).unwrap()
    }

    #[test]
    fn hosts_a_server_must_refuse() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        const HTTP_2: Version = Version::HTTP_2;
        for (version, uri, hosts, problem) in [
            (HTTP_11, "/", &[&b"users"[..]][..], None),
            (HTTP_11, "/", &[b"users.prod:8080"], None),
            (HTTP_11, "/", &[b"[::1]:80"], None),
            (HTTP_11, "/", &[b"10.0.0.1"], None),
            // The target has no authority: an empty Host (RFC 9112 §3.2). But `*` is
            // OPTIONS's only (these are GETs; OPTIONS below).
            (
                HTTP_11,
                "*",
                &[b""],
                Some("a request target that is neither a path nor * for OPTIONS"),
            ),
            (HTTP_10, "/", &[], None),
            (HTTP_2, "http://users/", &[], None),
            (HTTP_11, "http://users/", &[b"users"], None),
            (HTTP_11, "http://users/", &[], None),
            (
                HTTP_11,
                "/",
                &[],
                Some("an HTTP/1.1 request without a Host field"),
            ),
            (
                HTTP_11,
                "/",
                &[b"a", b"b"],
                Some("more than one Host field"),
            ),
            (
                HTTP_2,
                "http://a/",
                &[b"a", b"a"],
                Some("more than one Host field"),
            ),
            (
                HTTP_11,
                "/",
                &[b"b.example:1@admin.internal"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_2,
                "http://a/",
                &[b"a@b"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"a b"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"users/admin"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"users:port"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"users:+80"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"users:99999"],
                Some("a Host that is not host[:port]"),
            ),
            (HTTP_11, "/", &[b"users:"], None),
            (HTTP_11, "/", &[b"[::ffff:10.0.0.1]:8443"], None),
            (HTTP_11, "/", &[b"[fe80::1%25eth0]:8080"], None),
            (HTTP_11, "/", &[b"[v1.fe80::a+en1]"], None),
            (
                HTTP_11,
                "/",
                &[b"[fe80::1%eth0]"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"[::1@x]"],
                Some("a Host that is not host[:port]"),
            ),
            // A percent-encoded name is no authority to `http`: it could not go on as
            // one. Clients send punycode.
            (
                HTTP_11,
                "/",
                &[b"caf%C3%A9.example"],
                Some("a Host that is not host[:port]"),
            ),
            (HTTP_11, "/", &[b"xn--caf-dma.example"], None),
            // At most 8 colons in a literal (`::` and seven groups), as `http` takes.
            (HTTP_11, "/", &[b"[::1:2:3:4:5:6:7]:80"], None),
            (
                HTTP_11,
                "/",
                &[b"[::1:2:3:4:5:6:7:8]"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"[::1"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"[]"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"[::1]x"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"[::1]:x"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"a:1:2"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b":80"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"a%zz"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_11,
                "/",
                &[b"a\tb"],
                Some("a Host that is not host[:port]"),
            ),
            (
                HTTP_2,
                "http://b.example:1@admin.internal/",
                &[],
                Some("userinfo in the request's authority"),
            ),
        ] {
            let req = request(version, uri, hosts);
            assert_eq!(host_problem(&req), problem, "{version:?} {uri} {hosts:?}");
            // Every Host taken is an authority `http` parses.
            if problem.is_none()
                && let [host] = hosts
                && !host.is_empty()
            {
                assert!(
                    http::uri::Authority::try_from(*host).is_ok(),
                    "{:?}",
                    String::from_utf8_lossy(host)
                );
            }
        }
        let mut options = request(HTTP_11, "*", &[b""]);
        *options.method_mut() = http::Method::OPTIONS;
        assert_eq!(host_problem(&options), None);
    }

    /// A target that is no path is refused, in HTTP/2 (`:path`) as in HTTP/1.1; `*` only
    /// for OPTIONS.
    #[test]
    fn targets_must_be_paths() {
        const NO_PATH: Option<&str> =
            Some("a request target that is neither a path nor * for OPTIONS");
        for (version, path, problem) in [
            (Version::HTTP_2, "/x?y", None),
            (Version::HTTP_2, "?y", NO_PATH),
            // With an authority (`:authority`, or an absolute-form target).
            (Version::HTTP_2, "users ?y", NO_PATH),
            (Version::HTTP_11, "users ?y", None),
            (Version::HTTP_11, "?y", NO_PATH),
            (Version::HTTP_2, "*", NO_PATH),
        ] {
            // As h2 builds it for a request with a `Host` field and no `:authority`, or
            // with one (`authority path`).
            let mut parts = http::uri::Parts::default();
            let path = match path.split_once(' ') {
                Some((authority, path)) => {
                    parts.scheme = Some(http::uri::Scheme::HTTP);
                    parts.authority = Some(authority.parse().unwrap());
                    path
                }
                None => path,
            };
            parts.path_and_query = Some(http::uri::PathAndQuery::from_maybe_shared(path).unwrap());
            let req = Request::builder()
                .version(version)
                .header(header::HOST, "public.example")
                .uri(http::Uri::from_parts(parts).unwrap())
                .body(())
                .unwrap();
            assert_eq!(host_problem(&req), problem, "{path}");
        }
    }

    /// An extended CONNECT names one protocol an HTTP/1.1 upgrade could: not `h2c`, not
    /// a list.
    #[test]
    fn extended_connect_names_one_protocol_other_than_h2c() {
        const BAD: Option<&str> =
            Some("an extended CONNECT whose :protocol is not one protocol other than h2c");
        for (protocol, problem) in [
            ("websocket", None),
            ("HTTP/2.0", None),
            ("h2c", BAD),
            ("H2C", BAD),
            ("websocket, h2c", BAD),
            ("websocket,foo", BAD),
        ] {
            let mut req = Request::builder()
                .method(http::Method::CONNECT)
                .version(Version::HTTP_2)
                .uri("http://users/chat")
                .body(())
                .unwrap();
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from(protocol));
            assert_eq!(host_problem(&req), problem, "{protocol}");
        }
    }
}
