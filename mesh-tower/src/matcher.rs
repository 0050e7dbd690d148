//! Request matches compiled once: what authorization rules and routes select requests by.
//!
//! A [`RequestMatch`] is a [`mesh_core::config::RouteMatch`] made ready to run: regular
//! expressions compiled (anchored, so they match the whole path or value), header names
//! parsed, prefixes normalized. Matching a request then allocates nothing. Within one
//! match, every given condition must hold:
//!
//! | condition | holds when |
//! |---|---|
//! | `path = { exact = "/a" }` | the path is `/a` |
//! | `path = { prefix = "/a" }` | the path is `/a` or continues after it with `/` (`/a/b`), not `/ab`; a trailing `/` in the prefix is ignored, `/` matches every path |
//! | `path = { regex = "…" }` | the expression matches the whole path |
//! | `methods = [...]` | the method is one of them |
//! | `headers = [{ name, exact / regex / present }]` | each: every value of the header (at least one) is exactly / wholly matches the value; `present = false`: the header is absent; a header whose name differs only by `_` for `-` (`x_tenant`) counts as the same header |
//! | `query = [{ name, exact / regex }]` | each: the parameter is there and every value it has, as sent (not decoded), is exactly / wholly matches the value; names are case-sensitive and compared decoded (`%74enant` is `tenant`); a query holding `;` satisfies none |
//! | `grpc = { service, method }` | the path is `/service/method` (any method of the service when none is given) |
//!
//! **Paths are matched as sent, and only when unambiguous.** A path that a server could
//! read as another one — with a dot segment (`/a/../b`, `/./b`, or with path parameters,
//! `/a/..;x/b`, which Tomcat and Jetty resolve once they drop the parameters), an empty segment
//! (`//b`), a backslash, or a percent-encoded `/`, `\` or `.` — satisfies no path or gRPC
//! condition, so that a rule allowing `/public` cannot be used to reach `/admin` through
//! `/public/../admin`. Such a request still matches conditions without a path, and the
//! prefix `/`, which takes every path whatever it resolves to.

use http::{HeaderMap, HeaderName, Method, Request, Uri};
use mesh_core::config::{
    GrpcMatch, HeaderMatch, HeaderValueMatch, PathMatch, QueryMatch, QueryValueMatch, RouteMatch,
};
use regex::Regex;

/// A compiled [`RouteMatch`]; see the [module docs](self).
///
/// ```
/// use mesh_core::config::{PathMatch, RouteMatch};
/// use mesh_tower::matcher::RequestMatch;
///
/// let m = RequestMatch::new(&RouteMatch {
///     path: Some(PathMatch::Prefix("/users".into())),
///     methods: vec![http::Method::GET],
///     ..RouteMatch::default()
/// })?;
/// let get = |uri: &str| http::Request::get(uri).body(()).unwrap();
/// assert!(m.matches(&get("/users/42")));
/// assert!(!m.matches(&get("/usersx")));
/// assert!(!m.matches(&get("/users/../admin")));
/// # Ok::<(), mesh_tower::matcher::MatchError>(())
/// ```
#[derive(Clone, Debug)]
pub struct RequestMatch {
    path: Option<PathCondition>,
    methods: Vec<Method>,
    headers: Vec<HeaderCondition>,
    query: Vec<QueryCondition>,
}

#[derive(Clone, Debug)]
struct QueryCondition {
    /// The name decoded, as the application reads it: requests' names are decoded too
    /// before they are compared with it.
    name: Vec<u8>,
    value: QueryValue,
}

#[derive(Clone, Debug)]
enum QueryValue {
    Exact(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
enum PathCondition {
    Exact(String),
    /// Without its trailing `/`; empty for `/` (every path).
    Prefix(String),
    Regex(Regex),
    /// `/service/`, and the method if one is given.
    Grpc {
        service: String,
        method: Option<String>,
    },
}

#[derive(Clone, Debug)]
struct HeaderCondition {
    name: HeaderName,
    value: ValueCondition,
}

#[derive(Clone, Debug)]
enum ValueCondition {
    Exact(Vec<u8>),
    Regex(Regex),
    Present(bool),
}

/// Why a [`RouteMatch`] cannot be compiled. Configuration validation reports the same
/// problems with their keys; this is for matches built in code.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MatchError {
    /// A regular expression does not compile.
    #[error("invalid regex `{pattern}`: {reason}")]
    Regex {
        /// The expression.
        pattern: String,
        /// The regex crate's reason.
        reason: String,
    },
    /// A header name is not a valid HTTP header name.
    #[error("`{0}` is not a valid header name")]
    HeaderName(String),
    /// An exact or prefix path does not start with `/`.
    #[error("path `{0}` must start with `/`")]
    Path(String),
    /// A gRPC service or method name is empty or holds `/` or whitespace.
    #[error("`{0}` is not a gRPC service or method name")]
    Grpc(String),
    /// A query parameter name is empty or holds `&`, `=`, `#` or `;`.
    #[error("`{0}` is not a query parameter name")]
    QueryName(String),
    /// An exact or prefix path no request path can match: it holds `?` or `#`, or is
    /// ambiguous ([`is_ambiguous`]: `..`, `.` or empty segments, `\`, an encoded `/`,
    /// `\` or `.`), which request paths must not be to match.
    #[error(
        "path `{0}` can never match (`?` or `#`, or a `.`, `..` or empty segment, a `\\`, or an encoded `/`, `\\` or `.`)"
    )]
    NeverMatches(String),
    /// Both `path` and `grpc` were given.
    #[error("a match cannot have both `path` and `grpc` (a gRPC match is a path match)")]
    PathAndGrpc,
}

/// The whole of `pattern` must match.
fn anchored(pattern: &str) -> Result<Regex, MatchError> {
    mesh_core::config::anchored_regex(pattern).map_err(|e| MatchError::Regex {
        pattern: pattern.to_owned(),
        reason: e.to_string(),
    })
}

fn grpc_name(name: &str) -> Result<String, MatchError> {
    if name.is_empty() || name.contains('/') || name.contains(char::is_whitespace) {
        return Err(MatchError::Grpc(name.to_owned()));
    }
    Ok(name.to_owned())
}

impl RequestMatch {
    /// Compiles `m`.
    pub fn new(m: &RouteMatch) -> Result<Self, MatchError> {
        let path = match (&m.path, &m.grpc) {
            (Some(_), Some(_)) => return Err(MatchError::PathAndGrpc),
            (Some(p), None) => Some(path_condition(p)?),
            (None, Some(GrpcMatch { service, method })) => Some(PathCondition::Grpc {
                service: format!("/{}/", grpc_name(service)?),
                method: method.as_deref().map(grpc_name).transpose()?,
            }),
            (None, None) => None,
        };
        let headers = m
            .headers
            .iter()
            .map(header_condition)
            .collect::<Result<_, _>>()?;
        let query = m
            .query
            .iter()
            .map(query_condition)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            path,
            methods: m.methods.clone(),
            headers,
            query,
        })
    }

    /// A match of every request.
    pub fn any() -> Self {
        Self {
            path: None,
            methods: Vec::new(),
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    /// Whether `req` satisfies every condition.
    /// An HTTP/2 extended CONNECT matches as the `GET` it stands for
    /// ([`crate::upgrade::request_method`]).
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        self.matches_parts(
            crate::upgrade::request_method(req),
            req.uri(),
            req.headers(),
        )
    }

    /// [`matches`](Self::matches) on a request's parts.
    pub fn matches_parts(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.path.as_ref().is_none_or(|p| p.matches(uri.path()))
            && (self.headers.is_empty() || {
                // Rare: then each condition also reads the names that differ from its own
                // by `_` for `-` only.
                let underscored = headers.keys().any(|k| k.as_str().contains('_'));
                self.headers.iter().all(|h| h.matches(headers, underscored))
            })
            && (self.query.is_empty() || {
                let query = uri.query().unwrap_or("");
                self.query.iter().all(|q| q.matches(query))
            })
    }

    /// How specific the match is, for route precedence (greater is more specific): the
    /// path's kind and length (exact, then prefix by length, then regex, then none or
    /// `/`; a gRPC method is an exact path, a service alone a prefix), whether it names
    /// methods, and its numbers of header and query conditions.
    pub fn specificity(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            Some(PathCondition::Exact(e)) => (4, e.len()),
            Some(PathCondition::Grpc {
                service,
                method: Some(m),
            }) => (4, service.len() + m.len()),
            Some(PathCondition::Prefix(p)) if !p.is_empty() => (3, p.len()),
            Some(PathCondition::Grpc {
                service,
                method: None,
            }) => (3, service.len()),
            Some(PathCondition::Regex(_)) => (2, 0),
            Some(PathCondition::Prefix(_)) | None => (1, 0),
        };
        (
            kind,
            len,
            !self.methods.is_empty(),
            self.headers.len(),
            self.query.len(),
        )
    }

    /// The first segment every path this match takes begins with (`users` for an exact
    /// `/users/42`, a prefix `/users` or the gRPC service `users`): what a route table
    /// indexes matches by. `None` when paths of any first segment may match (a regex,
    /// the prefix `/`, no path condition).
    pub fn first_segment(&self) -> Option<&str> {
        let path = match self.path.as_ref()? {
            PathCondition::Exact(e) => e.as_str(),
            PathCondition::Prefix(p) if !p.is_empty() => p.as_str(),
            PathCondition::Grpc { service, .. } => service.as_str(),
            PathCondition::Prefix(_) | PathCondition::Regex(_) => return None,
        };
        first_segment(path)
    }

    /// Whether the match has a path (or gRPC) condition.
    pub fn has_path(&self) -> bool {
        self.path.is_some()
    }

    /// Whether the match holds for every request (no condition at all).
    pub fn is_any(&self) -> bool {
        self.path.is_none()
            && self.methods.is_empty()
            && self.headers.is_empty()
            && self.query.is_empty()
    }
}

/// The first segment of an origin-form path (`users` of `/users/42`, empty for `/`), or
/// `None` for a path that does not start with `/`.
pub fn first_segment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    Some(rest.split_once('/').map_or(rest, |(first, _)| first))
}

fn path_condition(p: &PathMatch) -> Result<PathCondition, MatchError> {
    if let PathMatch::Exact(path) | PathMatch::Prefix(path) = p
        && (path.contains(['?', '#']) || is_ambiguous(path))
    {
        return Err(MatchError::NeverMatches(path.clone()));
    }
    Ok(match p {
        PathMatch::Exact(e) if e.starts_with('/') => PathCondition::Exact(e.clone()),
        PathMatch::Prefix(prefix) if prefix.starts_with('/') => {
            PathCondition::Prefix(prefix.trim_end_matches('/').to_owned())
        }
        PathMatch::Exact(p) | PathMatch::Prefix(p) => return Err(MatchError::Path(p.clone())),
        PathMatch::Regex(re) => PathCondition::Regex(anchored(re)?),
        // A kind of match added to the configuration but not known here matches nothing
        // rather than everything.
        #[allow(unreachable_patterns)]
        _ => PathCondition::Exact(String::new()),
    })
}

fn header_condition(h: &HeaderMatch) -> Result<HeaderCondition, MatchError> {
    let name = HeaderName::from_bytes(h.name.as_bytes())
        .map_err(|_| MatchError::HeaderName(h.name.clone()))?;
    let value = match &h.value {
        HeaderValueMatch::Exact(v) => ValueCondition::Exact(v.as_bytes().to_vec()),
        HeaderValueMatch::Regex(re) => ValueCondition::Regex(anchored(re)?),
        HeaderValueMatch::Present(p) => ValueCondition::Present(*p),
        #[allow(unreachable_patterns)]
        _ => ValueCondition::Present(false),
    };
    Ok(HeaderCondition { name, value })
}

fn query_condition(q: &QueryMatch) -> Result<QueryCondition, MatchError> {
    if q.name.is_empty() || q.name.contains(['&', '=', '#', ';']) {
        return Err(MatchError::QueryName(q.name.clone()));
    }
    let value = match &q.value {
        QueryValueMatch::Exact(v) => QueryValue::Exact(v.clone()),
        QueryValueMatch::Regex(re) => QueryValue::Regex(anchored(re)?),
        // A kind of match this does not know matches nothing.
        #[allow(unreachable_patterns)]
        _ => QueryValue::Exact("\0".into()),
    };
    Ok(QueryCondition {
        name: decoded(&q.name),
        value,
    })
}

impl QueryCondition {
    /// The parameter must be there, and every value it has, as sent (not decoded), must
    /// match, as every value of a header must: applications differ on which of a repeated
    /// parameter they read (the first, the last, all), so `?tenant=a&tenant=b` meets a
    /// condition on `tenant=a` for none of them. (The Gateway API leaves repeated
    /// parameters undefined and suggests the first; a rule that admits must hold whichever
    /// the application reads.)
    ///
    /// For the same reason names are compared as the application reads them, decoded
    /// (`%XX`, and `+` for a space, as form decoding does): otherwise
    /// `?tenant=a&%74enant=b` would meet `tenant=a` here while the application reads
    /// `tenant=b` too. And a query holding `;` meets no condition: some applications split
    /// parameters on it as well as on `&` (`?tenant=a;tenant=b`), others take it as part
    /// of a value, and no single reading holds for both.
    fn matches(&self, query: &str) -> bool {
        if query.contains(';') {
            return false;
        }
        let mut values = query
            .split('&')
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                decoded_eq(name, &self.name).then_some(value)
            })
            .peekable();
        values.peek().is_some()
            && values.all(|v| match &self.value {
                QueryValue::Exact(want) => v == want,
                QueryValue::Regex(re) => re.is_match(v),
            })
    }
}

/// Whether two header names (lower case) are equal once every `_` is read as `-`.
fn same_but_underscores(a: &str, b: &str) -> bool {
    let dash = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}

/// The next byte `raw` stands for once decoded (`%XX` escapes, and `+` for a space; an
/// escape that is not one, `%zz`, stands for itself), and how many bytes of it that took.
fn decode_one(raw: &[u8]) -> Option<(u8, usize)> {
    Some(match *raw.first()? {
        b'+' => (b' ', 1),
        b'%' => match raw.get(1..3).and_then(hex_pair) {
            Some(byte) => (byte, 3),
            None => (b'%', 1),
        },
        b => (b, 1),
    })
}

/// A query parameter name decoded, as form decoding reads it.
fn decoded(name: &str) -> Vec<u8> {
    let mut raw = name.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    while let Some((byte, width)) = decode_one(raw) {
        out.push(byte);
        raw = &raw[width..];
    }
    out
}

/// Whether `raw`, a query parameter name as sent, is `want` (decoded) once decoded.
fn decoded_eq(raw: &str, want: &[u8]) -> bool {
    if !raw.contains(['%', '+']) {
        return raw.as_bytes() == want;
    }
    let mut raw = raw.as_bytes();
    let mut want = want.iter();
    while let Some((byte, width)) = decode_one(raw) {
        if want.next() != Some(&byte) {
            return false;
        }
        raw = &raw[width..];
    }
    want.next().is_none()
}

/// The byte two hex digits stand for.
fn hex_pair(digits: &[u8]) -> Option<u8> {
    let digit = |d: u8| (d as char).to_digit(16);
    let (hi, lo) = (digit(*digits.first()?)?, digit(*digits.get(1)?)?);
    u8::try_from(hi * 16 + lo).ok()
}

impl PathCondition {
    fn matches(&self, path: &str) -> bool {
        // The prefix `/` takes every path, however a server resolves it: no ambiguity can
        // lead outside it, so it takes ambiguous ones too (a route on `/` is the
        // catch-all the Gateway API says it is; a rule on `/` allows what it says).
        if is_ambiguous(path) && !matches!(self, Self::Prefix(p) if p.is_empty()) {
            return false;
        }
        match self {
            Self::Exact(e) => path == e,
            Self::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            Self::Regex(re) => re.is_match(path),
            Self::Grpc { service, method } => {
                path.strip_prefix(service.as_str())
                    .is_some_and(|rest| match method {
                        Some(m) => rest == m,
                        None => !rest.is_empty() && !rest.contains('/'),
                    })
            }
        }
    }
}

impl HeaderCondition {
    /// Every value of the header must meet the condition, and so must every value of a
    /// header whose name differs from it only by `_` for `-` (`x_tenant` for `x-tenant`):
    /// CGI-style applications (PHP, WSGI, Rack) read both as `HTTP_X_TENANT`, so a request
    /// carrying `x-tenant: a` and `x_tenant: b` must not pass a condition on `x-tenant: a`,
    /// nor `x_debug: 1` one on `x-debug` being absent. (`underscored`: some request
    /// header's name holds `_`; without one, and with no `_` in this condition's name,
    /// there is no such header.)
    fn matches(&self, headers: &HeaderMap, underscored: bool) -> bool {
        let direct = headers.get_all(&self.name).iter();
        let twins = (underscored || self.name.as_str().contains('_'))
            .then(|| {
                headers.iter().filter_map(|(name, value)| {
                    (*name != self.name && same_but_underscores(name.as_str(), self.name.as_str()))
                        .then_some(value)
                })
            })
            .into_iter()
            .flatten();
        let mut values = direct.chain(twins).peekable();
        match &self.value {
            ValueCondition::Present(present) => values.peek().is_some() == *present,
            ValueCondition::Exact(want) => {
                values.peek().is_some() && values.all(|v| v.as_bytes() == want.as_slice())
            }
            ValueCondition::Regex(re) => {
                values.peek().is_some() && values.all(|v| v.to_str().is_ok_and(|s| re.is_match(s)))
            }
        }
    }
}

/// Whether a server might resolve `path` to another path than it reads as: dot or empty
/// segments, backslashes, percent-encoded `/`, `\` or `.` (see
/// [`mesh_core::config::is_ambiguous_path`]).
pub use mesh_core::config::is_ambiguous_path as is_ambiguous;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_core::config::{
        GrpcMatch, HeaderMatch, HeaderValueMatch, QueryMatch, QueryValueMatch,
    };

    fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    fn get(uri: &str) -> Request<()> {
        req(Method::GET, uri, &[])
    }

    fn path(p: PathMatch) -> RequestMatch {
        RequestMatch::new(&RouteMatch {
            path: Some(p),
            ..RouteMatch::default()
        })
        .unwrap()
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let m = path(PathMatch::Prefix("/api".into()));
        for ok in ["/api", "/api/", "/api/x", "/api/x/y?q=1"] {
            assert!(m.matches(&get(ok)), "{ok}");
        }
        for no in ["/apix", "/ap", "/", "/x/api"] {
            assert!(!m.matches(&get(no)), "{no}");
        }
        // A trailing slash in the prefix changes nothing; `/` matches everything.
        let slash = path(PathMatch::Prefix("/api/".into()));
        assert!(slash.matches(&get("/api")) && slash.matches(&get("/api/x")));
        assert!(!slash.matches(&get("/apix")));
        let root = path(PathMatch::Prefix("/".into()));
        assert!(root.matches(&get("/")) && root.matches(&get("/anything/at/all")));
        // The asterisk form (`OPTIONS *`) is no path under `/` (found by fuzzing).
        assert!(!root.matches(&get("*")));
    }

    #[test]
    fn exact_and_regex_paths_match_the_whole_path() {
        let exact = path(PathMatch::Exact("/healthz".into()));
        assert!(exact.matches(&get("/healthz")) && exact.matches(&get("/healthz?full=1")));
        assert!(!exact.matches(&get("/healthz/")) && !exact.matches(&get("/healthzz")));
        let re = path(PathMatch::Regex("/users/[0-9]+".into()));
        assert!(re.matches(&get("/users/42")));
        assert!(!re.matches(&get("/users/42/x")) && !re.matches(&get("/x/users/42")));
        // Alternation stays inside the anchors.
        let alt = path(PathMatch::Regex("/a|/b".into()));
        assert!(alt.matches(&get("/a")) && alt.matches(&get("/b")));
        assert!(!alt.matches(&get("/ab")) && !alt.matches(&get("/x/b")));
    }

    #[test]
    fn ambiguous_paths_match_no_path_condition() {
        let m = path(PathMatch::Prefix("/public".into()));
        for sneaky in [
            "/public/../admin",
            "/public/./x",
            "/public//x",
            "/public/%2e%2e/admin",
            "/public/%2Fadmin",
            "/public\\..\\admin",
            "/public/..",
            "/public/x/%5c",
            "/public/..;/admin",
            "/public/..;jsessionid=x/admin",
            "/public/.;/x",
            "/public/..%3b/admin",
            "/public/..%3B",
        ] {
            assert!(is_ambiguous(sneaky), "{sneaky}");
            assert!(!m.matches(&get(sneaky)), "{sneaky}");
        }
        for plain in [
            "/public",
            "/public/",
            "/public/a.b",
            "/public/..a",
            "/public/%41",
            "/public/a;b",
            "/public/...;x",
        ] {
            assert!(!is_ambiguous(plain), "{plain}");
        }
        // A match without a path condition still holds, and so does the prefix `/`.
        assert!(RequestMatch::any().matches(&get("/public/../admin")));
        let everything = path(PathMatch::Prefix("/".into()));
        for sneaky in ["/public/../admin", "//x", "/a/%2e%2e/b", "/x\\y"] {
            assert!(everything.matches(&get(sneaky)), "{sneaky}");
        }
        assert!(!everything.matches(&Request::options("*").body(()).unwrap()));
    }

    #[test]
    fn methods_and_headers() {
        let m = RequestMatch::new(&RouteMatch {
            methods: vec![Method::GET, Method::HEAD],
            headers: vec![
                HeaderMatch {
                    name: "X-Env".into(),
                    value: HeaderValueMatch::Exact("prod".into()),
                },
                HeaderMatch {
                    name: "x-user".into(),
                    value: HeaderValueMatch::Regex("[a-z]+".into()),
                },
                HeaderMatch {
                    name: "x-debug".into(),
                    value: HeaderValueMatch::Present(false),
                },
            ],
            ..RouteMatch::default()
        })
        .unwrap();
        let ok = [("x-env", "prod"), ("x-user", "ann")];
        assert!(m.matches(&req(Method::GET, "/", &ok)));
        assert!(m.matches(&req(Method::HEAD, "/", &ok)));
        assert!(!m.matches(&req(Method::POST, "/", &ok)));
        assert!(!m.matches(&req(Method::GET, "/", &[("x-env", "prod")])));
        assert!(!m.matches(&req(
            Method::GET,
            "/",
            &[("x-env", "Prod"), ("x-user", "ann")]
        )));
        assert!(!m.matches(&req(
            Method::GET,
            "/",
            &[("x-env", "prod"), ("x-user", "ann1")]
        )));
        let debug = [("x-env", "prod"), ("x-user", "ann"), ("x-debug", "1")];
        assert!(!m.matches(&req(Method::GET, "/", &debug)));
        // Every value of a repeated header must match.
        let twice = [("x-env", "prod"), ("x-env", "dev"), ("x-user", "ann")];
        assert!(!m.matches(&req(Method::GET, "/", &twice)));
    }

    #[test]
    fn query_parameters_match_with_every_value_and_case_sensitive_names() {
        let m = RequestMatch::new(&RouteMatch {
            query: vec![
                QueryMatch {
                    name: "v".into(),
                    value: QueryValueMatch::Exact("2".into()),
                },
                QueryMatch {
                    name: "id".into(),
                    value: QueryValueMatch::Regex("[0-9]+".into()),
                },
            ],
            ..RouteMatch::default()
        })
        .unwrap();
        assert!(m.matches(&get("/x?v=2&id=42")));
        assert!(m.matches(&get("/x?id=7&other&v=2")));
        assert!(!m.matches(&get("/x?v=2")));
        assert!(!m.matches(&get("/x?V=2&id=42")), "names are case-sensitive");
        assert!(
            !m.matches(&get("/x?v=2&id=42x")),
            "regexes match the whole value"
        );
        assert!(!m.matches(&get("/x?v=3&v=2&id=1")), "every value counts");
        assert!(!m.matches(&get("/x?v=2&v=3&id=1")), "every value counts");
        assert!(m.matches(&get("/x?v=2&v=2&id=1&id=3")));
        assert!(!m.matches(&get("/x")));
        assert!(!m.is_any());
        // Names as the application decodes them: an encoded twin is one more value.
        for query in [
            "v=2&%76=3&id=1",
            "%76=3&v=2&id=1",
            "v=2&id=1&i%64=x",
            "v=2&id=1&i%64=x",
        ] {
            assert!(!m.matches(&get(&format!("/x?{query}"))), "{query}");
        }
        assert!(m.matches(&get("/x?%76=2&%69%64=5")), "encoded names count");
        assert!(
            m.matches(&get("/x?v=2&id=1&%7a=9&v%zz=1&%=2")),
            "other names do not"
        );
        // `;` splits parameters for some applications and not for others: no match.
        assert!(!m.matches(&get("/x?v=2&id=1;v=3")));
        assert!(!m.matches(&get("/x?v=2;&id=1")));
        let spaced = RequestMatch::new(&RouteMatch {
            query: vec![QueryMatch {
                name: "a b".into(),
                value: QueryValueMatch::Exact("1".into()),
            }],
            ..RouteMatch::default()
        })
        .unwrap();
        assert!(spaced.matches(&get("/x?a+b=1")));
        assert!(spaced.matches(&get("/x?a%20b=1")));
        assert!(!spaced.matches(&get("/x?a%20b=1&a+b=2")));
    }

    #[test]
    fn regexes_match_whole_texts_and_cannot_escape_their_anchors() {
        let path = |re: &str| {
            RequestMatch::new(&RouteMatch {
                path: Some(PathMatch::Regex(re.into())),
                ..RouteMatch::default()
            })
        };
        // Wrapped as text, this would leave its second branch unanchored.
        for escape in ["/a)|(/b", "/a)|.*(", "(/a"] {
            assert!(
                matches!(path(escape), Err(MatchError::Regex { .. })),
                "{escape}"
            );
        }
        // A verbose-mode comment at the end does not swallow the anchor.
        let verbose = path("(?x)/users/[0-9]+ # an id").unwrap();
        assert!(verbose.matches(&get("/users/42")));
        assert!(!verbose.matches(&get("/users/42/x")));
        assert!(!verbose.matches(&get("/x/users/42")));
        let alternation = path("/a|/b").unwrap();
        assert!(alternation.matches(&get("/b")));
        assert!(!alternation.matches(&get("/x/b")));
        assert!(!alternation.matches(&get("/a/x")));
    }

    #[test]
    fn a_header_spelt_with_underscores_is_the_same_header() {
        let m = RequestMatch::new(&RouteMatch {
            headers: vec![
                HeaderMatch {
                    name: "x-tenant".into(),
                    value: HeaderValueMatch::Exact("a".into()),
                },
                HeaderMatch {
                    name: "x-debug".into(),
                    value: HeaderValueMatch::Present(false),
                },
            ],
            ..RouteMatch::default()
        })
        .unwrap();
        assert!(m.matches(&req(Method::GET, "/", &[("x-tenant", "a")])));
        assert!(m.matches(&req(
            Method::GET,
            "/",
            &[("x-tenant", "a"), ("x_other", "1")]
        )));
        // CGI-style applications read both as HTTP_X_TENANT.
        for twin in [
            [("x-tenant", "a"), ("x_tenant", "b")],
            [("x_tenant", "b"), ("x-tenant", "a")],
            [("x-tenant", "a"), ("x_debug", "1")],
        ] {
            assert!(!m.matches(&req(Method::GET, "/", &twin)), "{twin:?}");
        }
        assert!(
            m.matches(&req(Method::GET, "/", &[("x_tenant", "a")])),
            "the same header"
        );
        // A condition spelt with `_` takes the `-` spelling too.
        let under = RequestMatch::new(&RouteMatch {
            headers: vec![HeaderMatch {
                name: "x_env".into(),
                value: HeaderValueMatch::Exact("prod".into()),
            }],
            ..RouteMatch::default()
        })
        .unwrap();
        assert!(under.matches(&req(Method::GET, "/", &[("x-env", "prod")])));
        assert!(!under.matches(&req(
            Method::GET,
            "/",
            &[("x_env", "prod"), ("x-env", "dev")]
        )));
        assert!(same_but_underscores("a_b-c", "a-b_c"));
        assert!(!same_but_underscores("a_b", "a_bc"));
        assert!(!same_but_underscores("a.b", "a-b"));
    }

    #[test]
    fn decoding_names() {
        assert!(decoded_eq("tenant", b"tenant"));
        assert!(decoded_eq("%74enant", b"tenant"));
        assert!(decoded_eq("%74%65NANT", b"teNANT"));
        assert!(!decoded_eq("%74enan", b"tenant"));
        assert!(!decoded_eq("%74enantx", b"tenant"));
        assert!(decoded_eq("%zz", b"%zz"));
        assert!(decoded_eq("a%", b"a%"));
        assert!(decoded_eq("a%4", b"a%4"));
        assert!(decoded_eq("%E2%82%AC", "€".as_bytes()));
        assert!(!decoded_eq("%E2%82", "€".as_bytes()));
        // A configured name is decoded too: written encoded, it matches either spelling.
        assert_eq!(decoded("filter%5Bstatus%5D"), b"filter[status]");
        assert!(decoded_eq(
            "filter%5Bstatus%5D",
            &decoded("filter%5Bstatus%5D")
        ));
        assert!(decoded_eq("filter[status]", &decoded("filter%5Bstatus%5D")));
        assert!(decoded_eq("a+b", &decoded("a+b")));
        assert_eq!(decoded("%zz%4"), b"%zz%4");
    }

    #[test]
    fn grpc_service_and_method() {
        let grpc = |service: &str, method: Option<&str>| {
            RequestMatch::new(&RouteMatch {
                grpc: Some(GrpcMatch {
                    service: service.into(),
                    method: method.map(Into::into),
                }),
                ..RouteMatch::default()
            })
        };
        let service = grpc("users.v1.Users", None).unwrap();
        assert!(service.matches(&req(Method::POST, "/users.v1.Users/GetUser", &[])));
        assert!(!service.matches(&req(Method::POST, "/users.v1.Users/", &[])));
        assert!(!service.matches(&req(Method::POST, "/users.v1.UsersX/GetUser", &[])));
        assert!(!service.matches(&req(Method::POST, "/users.v1.Users/a/b", &[])));
        let method = grpc("users.v1.Users", Some("GetUser")).unwrap();
        assert!(method.matches(&req(Method::POST, "/users.v1.Users/GetUser", &[])));
        assert!(!method.matches(&req(Method::POST, "/users.v1.Users/DeleteUser", &[])));
        assert!(matches!(grpc("a/b", None), Err(MatchError::Grpc(_))));
        assert!(matches!(grpc("a", Some("")), Err(MatchError::Grpc(_))));
    }

    #[test]
    fn bad_matches_say_what_is_wrong() {
        let bad = |m: RouteMatch| RequestMatch::new(&m).unwrap_err().to_string();
        let e = bad(RouteMatch {
            path: Some(PathMatch::Regex("(".into())),
            ..RouteMatch::default()
        });
        assert!(e.starts_with("invalid regex `(`"), "{e}");
        let e = bad(RouteMatch {
            path: Some(PathMatch::Prefix("api".into())),
            ..RouteMatch::default()
        });
        assert_eq!(e, "path `api` must start with `/`");
        let e = bad(RouteMatch {
            headers: vec![HeaderMatch {
                name: "bad name".into(),
                value: HeaderValueMatch::Present(true),
            }],
            ..RouteMatch::default()
        });
        assert_eq!(e, "`bad name` is not a valid header name");
    }
}
