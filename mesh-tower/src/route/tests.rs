#![allow(clippy::unwrap_used)]

use mesh_core::config::{
    BackendRef, GrpcMatch, HeaderMatch, HeaderValueMatch, PathMatch, QueryMatch, QueryValueMatch,
    RouteConfig, RouteMatch,
};
use proptest::prelude::*;

use super::RouteTable;

fn route(name: &str, hosts: &[&str], matches: Vec<RouteMatch>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        hosts: hosts.iter().map(|h| (*h).into()).collect(),
        matches,
        backends: vec![BackendRef {
            service: "s".into(),
            weight: 1,
        }],
        retry: None,
        timeout: None,
        fault: None,
    }
}

fn path(p: PathMatch) -> RouteMatch {
    RouteMatch {
        path: Some(p),
        ..RouteMatch::default()
    }
}

fn prefix(p: &str) -> RouteMatch {
    path(PathMatch::Prefix(p.into()))
}

fn header(name: &str) -> HeaderMatch {
    HeaderMatch {
        name: name.into(),
        value: HeaderValueMatch::Present(true),
    }
}

fn select(table: &RouteTable, req: http::Request<()>) -> Option<String> {
    table.select(&req).map(|s| s.name.to_owned())
}

fn get(uri: &str) -> http::Request<()> {
    http::Request::get(uri).body(()).unwrap()
}

#[test]
fn exact_paths_beat_prefixes_and_longer_prefixes_beat_shorter() {
    let t = RouteTable::new(&[
        route("root", &[], vec![prefix("/")]),
        route("short", &[], vec![prefix("/api")]),
        route("long", &[], vec![prefix("/api/users")]),
        route(
            "exact",
            &[],
            vec![path(PathMatch::Exact("/api/users/me".into()))],
        ),
        route("regex", &[], vec![path(PathMatch::Regex("/api/.*".into()))]),
    ])
    .unwrap();
    assert_eq!(select(&t, get("/api/users/me")).as_deref(), Some("exact"));
    assert_eq!(select(&t, get("/api/users/42")).as_deref(), Some("long"));
    assert_eq!(select(&t, get("/api/other")).as_deref(), Some("short"));
    assert_eq!(select(&t, get("/elsewhere")).as_deref(), Some("root"));
    // A regex is above `/` but below any longer prefix.
    let t = RouteTable::new(&[
        route("root", &[], vec![]),
        route(
            "regex",
            &[],
            vec![path(PathMatch::Regex("/x/[0-9]+".into()))],
        ),
    ])
    .unwrap();
    assert_eq!(select(&t, get("/x/42")).as_deref(), Some("regex"));
    assert_eq!(
        select(&t, get("/x/42/y")).as_deref(),
        Some("root"),
        "a regex matches the whole path"
    );
}

#[test]
fn then_methods_then_header_count_then_query_count_then_order() {
    let with = |methods: Vec<http::Method>, headers: usize, query: usize| RouteMatch {
        path: Some(PathMatch::Prefix("/a".into())),
        methods,
        headers: (0..headers).map(|i| header(&format!("x-{i}"))).collect(),
        query: (0..query)
            .map(|i| QueryMatch {
                name: format!("q{i}"),
                value: QueryValueMatch::Regex(".*".into()),
            })
            .collect(),
        ..RouteMatch::default()
    };
    let t = RouteTable::new(&[
        route("plain", &[], vec![with(vec![], 0, 0)]),
        route("first-tie", &[], vec![with(vec![], 0, 1)]),
        route("query", &[], vec![with(vec![], 0, 1)]),
        route("headers", &[], vec![with(vec![], 2, 0)]),
        route("method", &[], vec![with(vec![http::Method::POST], 0, 0)]),
    ])
    .unwrap();
    let req = |method: http::Method, headers: usize, query: &str| {
        let mut r = http::Request::builder()
            .method(method)
            .uri(format!("/a/b{query}"));
        for i in 0..headers {
            r = r.header(format!("x-{i}"), "1");
        }
        r.body(()).unwrap()
    };
    assert_eq!(
        select(&t, req(http::Method::POST, 2, "?q0=1")).as_deref(),
        Some("method")
    );
    assert_eq!(
        select(&t, req(http::Method::GET, 2, "?q0=1")).as_deref(),
        Some("headers")
    );
    // Equal specificity: the earlier route.
    assert_eq!(
        select(&t, req(http::Method::GET, 0, "?q0=1")).as_deref(),
        Some("first-tie")
    );
    assert_eq!(
        select(&t, req(http::Method::GET, 0, "")).as_deref(),
        Some("plain")
    );
    // Within one route, the earlier match decides the match index among equals.
    let t = RouteTable::new(&[route("r", &[], vec![prefix("/a"), prefix("/a")])]).unwrap();
    assert_eq!(t.select(&get("/a")).unwrap().matched, 0);
}

#[test]
fn hostnames_exact_then_longest_wildcard_then_any() {
    let t = RouteTable::new(&[
        route("any", &[], vec![]),
        route("org", &["*.org"], vec![]),
        route("example", &["*.example.org"], vec![]),
        route("exact", &["api.example.org"], vec![]),
    ])
    .unwrap();
    assert_eq!(
        select(&t, get("http://api.example.org/")).as_deref(),
        Some("exact")
    );
    assert_eq!(
        select(&t, get("http://API.Example.ORG:8443/")).as_deref(),
        Some("exact"),
        "case and port ignored"
    );
    assert_eq!(
        select(&t, get("http://a.b.example.org/")).as_deref(),
        Some("example"),
        "one or more labels"
    );
    assert_eq!(
        select(&t, get("http://example.org/")).as_deref(),
        Some("org"),
        "never the bare suffix"
    );
    assert_eq!(select(&t, get("http://org/")).as_deref(), Some("any"));
    assert_eq!(select(&t, get("http://other.net/")).as_deref(), Some("any"));
    // The Host header when the URI has no authority (HTTP/1.1 origin form).
    let req = http::Request::get("/")
        .header("host", "api.example.org:80")
        .body(())
        .unwrap();
    assert_eq!(select(&t, req).as_deref(), Some("exact"));
    // A fully qualified name is the same name; an empty label is no hostname, so no
    // wildcard takes it as a label (found by the route_select fuzz target).
    assert_eq!(
        select(&t, get("http://api.example.org./")).as_deref(),
        Some("exact")
    );
    for host in [".example.org", "a..example.org", "api.example.org.."] {
        let req = http::Request::get("/")
            .header("host", host)
            .body(())
            .unwrap();
        assert_eq!(select(&t, req).as_deref(), Some("any"), "{host}");
    }
    // A more specific hostname wins over a more specific path.
    let t = RouteTable::new(&[
        route("any-deep", &[], vec![path(PathMatch::Exact("/a/b".into()))]),
        route("host", &["h.example.org"], vec![prefix("/")]),
    ])
    .unwrap();
    assert_eq!(
        select(&t, get("http://h.example.org/a/b")).as_deref(),
        Some("host")
    );
    assert_eq!(
        select(&t, get("http://x.example.org/a/b")).as_deref(),
        Some("any-deep")
    );
}

#[test]
fn grpc_methods_beat_services_and_unmatched_requests_select_nothing() {
    let grpc = |service: &str, method: Option<&str>| RouteMatch {
        grpc: Some(GrpcMatch {
            service: service.into(),
            method: method.map(Into::into),
        }),
        ..RouteMatch::default()
    };
    let t = RouteTable::new(&[
        route("service", &[], vec![grpc("users.v1.Users", None)]),
        route("method", &[], vec![grpc("users.v1.Users", Some("GetUser"))]),
    ])
    .unwrap();
    let post = |p: &str| http::Request::post(p).body(()).unwrap();
    assert_eq!(
        select(&t, post("/users.v1.Users/GetUser")).as_deref(),
        Some("method")
    );
    assert_eq!(
        select(&t, post("/users.v1.Users/ListUsers")).as_deref(),
        Some("service")
    );
    assert_eq!(select(&t, post("/billing.v1.Billing/Charge")), None);
}

#[test]
fn bad_routes_say_which_and_what() {
    let e = RouteTable::new(&[route("r", &["*bad.org"], vec![])]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "route `r`: `*bad.org` is not a hostname (or `*.` and one)"
    );
    let e = RouteTable::new(&[route("r", &[], vec![path(PathMatch::Regex("(".into()))])])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("route `r`, matches[0]: invalid regex"), "{e}");
}

/// A matching (route, match): positions, match specificity, hostname rank.
type Candidate = (usize, usize, (u8, usize, bool, usize, usize), usize);

/// A reference: every (route, match) that matches, with its precedence, computed the
/// slow way.
fn candidates(routes: &[RouteConfig], req: &http::Request<()>) -> Vec<Candidate> {
    let host = req.uri().host().unwrap_or("").to_ascii_lowercase();
    let mut out = Vec::new();
    for (r, config) in routes.iter().enumerate() {
        let host_rank = if config.hosts.is_empty() {
            Some(0)
        } else {
            config
                .hosts
                .iter()
                .filter_map(|h| {
                    let h = h.to_ascii_lowercase();
                    match h.strip_prefix('*') {
                        Some(suffix) => (host.ends_with(suffix) && host.len() > suffix.len())
                            .then_some(suffix.len()),
                        None => (h == host).then_some(1000),
                    }
                })
                .max()
        };
        let Some(host_rank) = host_rank else { continue };
        let matchers: Vec<_> = if config.matches.is_empty() {
            vec![crate::matcher::RequestMatch::any()]
        } else {
            config
                .matches
                .iter()
                .map(|m| crate::matcher::RequestMatch::new(m).unwrap())
                .collect()
        };
        for (i, m) in matchers.iter().enumerate() {
            if m.matches(req) {
                out.push((r, i, m.specificity(), host_rank));
            }
        }
    }
    out
}

proptest! {
    /// Random route sets: the chosen route matches, and no matching (route, match) has
    /// a more specific hostname, or the same hostname rank and a more specific match.
    /// Up to 48 routes, so that hostname buckets are both scanned and indexed by path
    /// segment.
    #[test]
    fn the_selected_route_matches_and_nothing_more_specific_does(
        specs in prop::collection::vec((0usize..4, 0usize..8, 0usize..3, prop::bool::ANY, 0usize..3), 1..48),
        host in 0usize..4,
        path_pick in 0usize..9,
        post in prop::bool::ANY,
        with_header in prop::bool::ANY,
    ) {
        let hosts = [vec![], vec!["a.example.org"], vec!["*.example.org"], vec!["*.org"]];
        let paths = ["/", "/a", "/a/b", "/a/b/c", "/z", "/b", "/b/c", "/ab", "/a/"];
        let routes: Vec<RouteConfig> = specs
            .iter()
            .enumerate()
            .map(|(k, &(h, p, kind, method, headers))| {
                let m = RouteMatch {
                    path: Some(match kind {
                        0 => PathMatch::Prefix(paths[p].into()),
                        1 => PathMatch::Exact(paths[p].into()),
                        _ => PathMatch::Regex(format!("{}(/.*)?", paths[p].trim_end_matches('/'))),
                    }),
                    methods: if method { vec![http::Method::POST] } else { vec![] },
                    headers: (0..headers).map(|_| header("x-h")).collect(),
                    ..RouteMatch::default()
                };
                route(&format!("r{k}"), &hosts[h], vec![m])
            })
            .collect();
        let table = RouteTable::new(&routes).unwrap();
        let host = ["a.example.org", "b.example.org", "example.org", "other.net"][host];
        let mut req = http::Request::builder()
            .method(if post { http::Method::POST } else { http::Method::GET })
            .uri(format!("http://{host}{}", paths[path_pick]));
        if with_header {
            req = req.header("x-h", "1");
        }
        let req = req.body(()).unwrap();
        let all = candidates(&routes, &req);
        match table.select(&req) {
            None => prop_assert!(all.is_empty(), "{all:?}"),
            Some(chosen) => {
                let mine = all.iter().find(|c| c.0 == chosen.route && c.1 == chosen.matched);
                prop_assert!(mine.is_some(), "the chosen route does not match");
                let &(r, _, spec, host_rank) = mine.unwrap();
                for &(r2, _, spec2, host_rank2) in &all {
                    prop_assert!(host_rank2 <= host_rank, "route {r2} has a better hostname than {r}");
                    if host_rank2 == host_rank {
                        prop_assert!(spec2 < spec || (spec2 == spec && r2 >= r), "route {r2} beats {r}");
                    }
                }
            }
        }
    }
}
