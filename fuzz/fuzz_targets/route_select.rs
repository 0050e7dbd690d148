//! Route tables: compiling any routes never panics, and the route a request selects is
//! the one a plain reference picks. The reference reads the request's host (URI host,
//! else the `Host` header, port and one trailing dot dropped, case-insensitive), matches
//! it against each route's hostnames (exact, or `*.suffix` with one or more non-empty
//! leading labels, never the bare suffix; no hostnames: any host), runs each match with
//! `RequestMatch`, and takes the most specific hostname, then the most specific match,
//! then route and match order. Hostnames the reference does not judge (a malformed
//! `Host` header, a route hostname that is not a
//! name or `*.` and a name) only weaken the check: the selected match must still hold.
//! A request host with an empty label (`.example.org`, `a..example.org`) is no
//! hostname: only routes for any host apply (seed `empty-label`, which the first run
//! found taken by `*.example.org`). Eight routes of four matches fill a hostname bucket
//! past 16 matches, so the table's index by first path segment is fuzzed too (seed
//! `indexed-bucket`).
//!
//! The input is lines, each a tag and its text (one space after the tag is dropped):
//! `U` request URI, `V` request method, `H name:value` request header; `R name` starts a
//! route, `h` adds a hostname, `m` starts a match; in a match `=` exact, `^` prefix and
//! `~` regex path, `M` method, `e name:value` / `x name:regex` / `+name` / `-name` header,
//! `q name=value` / `Q name=regex` query, `g service[/method]` gRPC.
#![no_main]

use http::Request;
use libfuzzer_sys::fuzz_target;
use mesh_core::config::{
    BackendRef, GrpcMatch, HeaderMatch, HeaderValueMatch, PathMatch, QueryMatch, QueryValueMatch,
    RouteConfig, RouteMatch,
};
use mesh_tower::matcher::RequestMatch;
use mesh_tower::route::RouteTable;

const MAX_ROUTES: usize = 8;
const MAX_HOSTS: usize = 6;
const MAX_MATCHES: usize = 4;
/// Per list in a match (methods, headers, query) and request headers / 2.
const MAX_ITEMS: usize = 4;

fuzz_target!(|data: &str| {
    let Some((routes, req)) = parse(data) else {
        return;
    };
    let Ok(table) = RouteTable::new(&routes) else {
        return;
    };
    let selected = table.select(&req);

    let host = request_host(&req);
    let matchers: Vec<Vec<RequestMatch>> = routes
        .iter()
        .map(|r| {
            if r.matches.is_empty() {
                vec![RequestMatch::any()]
            } else {
                r.matches
                    .iter()
                    .map(|m| RequestMatch::new(m).expect("the table compiled this match"))
                    .collect()
            }
        })
        .collect();
    // Per route: Some(Some(tier)) matching host, Some(None) not, None not judged.
    let tiers: Vec<Option<Option<Tier>>> = routes.iter().map(|r| route_tier(r, host)).collect();

    if let Some(sel) = selected {
        let route = &routes[sel.route];
        assert_eq!(sel.name, route.name);
        assert_ne!(
            tiers[sel.route],
            Some(None),
            "route {} selected, but none of its hosts {:?} matches {host:?}",
            sel.route,
            route.hosts
        );
        let m = matchers[sel.route]
            .get(sel.matched)
            .expect("the selected match exists");
        assert!(
            m.matches(&req),
            "route {} match {} selected, but it does not hold",
            sel.route,
            sel.matched
        );
    } else {
        for (i, (tier, ms)) in tiers.iter().zip(&matchers).enumerate() {
            if let Some(Some(_)) = tier {
                assert!(
                    !ms.iter().any(|m| m.matches(&req)),
                    "nothing selected, but route {i} matches {host:?} and the request"
                );
            }
        }
    }

    // The precedence, when every hostname was judged.
    if tiers.iter().all(Option::is_some) {
        // The best match so far: its hostname tier, its rule's specificity, and where it is.
        type Best = (Tier, (u8, usize, bool, usize, usize), usize, usize);
        let mut best: Option<Best> = None;
        for (i, (tier, ms)) in tiers.iter().zip(&matchers).enumerate() {
            let Some(Some(tier)) = *tier else { continue };
            for (j, m) in ms.iter().enumerate() {
                let key = (tier, m.specificity());
                if m.matches(&req) && best.is_none_or(|b| key > (b.0, b.1)) {
                    best = Some((tier, key.1, i, j));
                }
            }
        }
        assert_eq!(
            selected.map(|s| (s.route, s.matched)),
            best.map(|b| (b.2, b.3)),
            "precedence; request host {host:?}"
        );
    }
});

/// How specific a route's matching hostname is: exact (2), then a wildcard by its
/// suffix's length (1), then any host (0).
type Tier = (u8, usize);

/// The request's host as the reference reads it.
#[derive(Clone, Copy, Debug)]
enum Host<'a> {
    /// Without port and trailing dot; not yet lowercased.
    Name(&'a str),
    /// No host: only routes for any host apply.
    Absent,
    /// A `Host` header that is not `host[:port]`.
    Malformed,
}

fn request_host<B>(req: &Request<B>) -> Host<'_> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => {
            let Some(value) = req.headers().get(http::header::HOST) else {
                return Host::Absent;
            };
            let Ok(value) = value.to_str() else {
                return Host::Absent;
            };
            // `[v6]` or a name without `:`, then nothing or `:` and digits.
            let end = if value.starts_with('[') {
                value.find(']').map(|i| i + 1)
            } else {
                Some(value.find(':').unwrap_or(value.len()))
            };
            let Some(end) = end else {
                return Host::Malformed;
            };
            let port = &value[end..];
            if !port.is_empty()
                && !port
                    .strip_prefix(':')
                    .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
            {
                return Host::Malformed;
            }
            &value[..end]
        }
    };
    let name = raw.strip_suffix('.').unwrap_or(raw);
    // RFC 1035: no longer name can match a route's hostname.
    if name.is_empty() || name.len() > 253 {
        return Host::Absent;
    }
    // A name with an empty label is no hostname: only routes for any host apply.
    if !is_name(name) {
        return Host::Absent;
    }
    Host::Name(name)
}

/// The best tier of `route`'s hostnames for `host`; None if a hostname is not judged.
fn route_tier(route: &RouteConfig, host: Host<'_>) -> Option<Option<Tier>> {
    if route.hosts.is_empty() {
        return Some(Some((0, 0)));
    }
    let mut best = None;
    for pattern in &route.hosts {
        let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
        let (wildcard, name) = match pattern.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, pattern),
        };
        let ipv6 = !wildcard && name.starts_with('[') && name.ends_with(']');
        if !ipv6 && (!is_name(name) || name.contains([':', '*', '[', ']'])) {
            return None;
        }
        let host = match host {
            Host::Name(h) => h,
            Host::Absent => continue,
            Host::Malformed => return None,
        };
        let tier = if wildcard {
            // `label(.label)*.suffix`, with the suffix case-insensitive.
            let Some(split) = host.len().checked_sub(name.len() + 1) else {
                continue;
            };
            let (labels, rest) = host.as_bytes().split_at(split);
            let under_name = rest[0] == b'.' && rest[1..].eq_ignore_ascii_case(name.as_bytes());
            let whole_labels = labels.split(|&b| b == b'.').all(|l| !l.is_empty());
            if !(under_name && whole_labels) {
                continue;
            }
            (1, name.len())
        } else if host.eq_ignore_ascii_case(name) {
            (2, 0)
        } else {
            continue;
        };
        best = best.max(Some(tier));
    }
    Some(best)
}

/// Non-empty labels separated by dots.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|l| !l.is_empty())
}

fn parse(data: &str) -> Option<(Vec<RouteConfig>, Request<()>)> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    let mut req = Request::builder();
    let mut uri = "/";
    let mut req_headers = 0;
    for line in data.lines() {
        let mut chars = line.chars();
        let Some(tag) = chars.next() else { continue };
        let text = chars.as_str();
        let text = text.strip_prefix(' ').unwrap_or(text);
        match tag {
            'U' => uri = text,
            'V' => req = req.method(text),
            'H' if req_headers < 2 * MAX_ITEMS => {
                let (name, value) = text.split_once(':')?;
                req = req.header(name, value.as_bytes());
                req_headers += 1;
            }
            'R' if routes.len() < MAX_ROUTES => routes.push(RouteConfig {
                name: text.to_owned(),
                hosts: Vec::new(),
                matches: Vec::new(),
                backends: vec![BackendRef {
                    service: "backend".into(),
                    weight: 1,
                }],
                retry: None,
                timeout: None,
                fault: None,
            }),
            'h' => {
                if let Some(route) = routes.last_mut()
                    && route.hosts.len() < MAX_HOSTS
                {
                    route.hosts.push(text.to_owned());
                }
            }
            'm' => {
                if let Some(route) = routes.last_mut()
                    && route.matches.len() < MAX_MATCHES
                {
                    route.matches.push(RouteMatch::default());
                }
            }
            _ => {
                let Some(route) = routes.last_mut() else {
                    continue;
                };
                if route.matches.is_empty() {
                    route.matches.push(RouteMatch::default());
                }
                let m = route.matches.last_mut()?;
                condition(m, tag, text)?;
            }
        }
    }
    req.uri(uri).body(()).ok().map(|req| (routes, req))
}

/// Adds the condition of one line to `m`; None for a method http refuses.
fn condition(m: &mut RouteMatch, tag: char, text: &str) -> Option<()> {
    let full = |len: usize| len >= MAX_ITEMS;
    match tag {
        '=' => m.path = Some(PathMatch::Exact(text.to_owned())),
        '^' => m.path = Some(PathMatch::Prefix(text.to_owned())),
        '~' => m.path = Some(PathMatch::Regex(text.to_owned())),
        'M' if !full(m.methods.len()) => {
            m.methods
                .push(http::Method::from_bytes(text.as_bytes()).ok()?);
        }
        'e' | 'x' | '+' | '-' if !full(m.headers.len()) => {
            let (name, value) = match tag {
                'e' | 'x' => text.split_once(':').unwrap_or((text, "")),
                _ => (text, ""),
            };
            let value = match tag {
                'e' => HeaderValueMatch::Exact(value.to_owned()),
                'x' => HeaderValueMatch::Regex(value.to_owned()),
                _ => HeaderValueMatch::Present(tag == '+'),
            };
            m.headers.push(HeaderMatch {
                name: name.to_owned(),
                value,
            });
        }
        'q' | 'Q' if !full(m.query.len()) => {
            let (name, value) = text.split_once('=').unwrap_or((text, ""));
            let value = match tag {
                'q' => QueryValueMatch::Exact(value.to_owned()),
                _ => QueryValueMatch::Regex(value.to_owned()),
            };
            m.query.push(QueryMatch {
                name: name.to_owned(),
                value,
            });
        }
        'g' => {
            let (service, method) = match text.split_once('/') {
                Some((s, method)) => (s, Some(method.to_owned())),
                None => (text, None),
            };
            m.grpc = Some(GrpcMatch {
                service: service.to_owned(),
                method,
            });
        }
        _ => {}
    }
    Some(())
}
