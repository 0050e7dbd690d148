//! Route matches and authorization policies: compiling any path, header and regex
//! conditions and matching any request never panics; a prefix match holds exactly on
//! segment boundaries; an ambiguous path (dot or empty segments, encoded separators)
//! satisfies no path condition but the prefix `/`, so no narrower rule can be reached
//! through one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::config::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, HeaderMatch, HeaderValueMatch,
    PathMatch, RouteMatch,
};
use mesh_tower::authz::Policy;
use mesh_tower::matcher::{RequestMatch, is_ambiguous};

fuzz_target!(|data: &str| {
    let mut fields = data.splitn(5, '\n');
    let kind = fields.next().unwrap_or("").bytes().next().unwrap_or(0);
    let pattern = fields.next().unwrap_or("").to_owned();
    let path = fields.next().unwrap_or("/");
    let header_pattern = fields.next().unwrap_or("").to_owned();
    let header_value = fields.next().unwrap_or("");
    let path_match = match kind % 3 {
        0 => PathMatch::Exact(pattern.clone()),
        1 => PathMatch::Prefix(pattern.clone()),
        _ => PathMatch::Regex(pattern.clone()),
    };
    let route = RouteMatch {
        path: Some(path_match),
        headers: vec![HeaderMatch {
            name: "x-fuzz".into(),
            value: if kind & 4 == 0 {
                HeaderValueMatch::Exact(header_pattern)
            } else {
                HeaderValueMatch::Regex(header_pattern)
            },
        }],
        ..RouteMatch::default()
    };
    let Ok(compiled) = RequestMatch::new(&route) else {
        return;
    };
    let Ok(req) = http::Request::get(path)
        .header("x-fuzz", header_value)
        .body(())
    else {
        return;
    };
    let path = req.uri().path();
    let matched = compiled.matches(&req);
    // Only the prefix `/` (which no resolution can leave) takes an ambiguous path.
    let everything =
        matches!(&route.path, Some(PathMatch::Prefix(p)) if p.trim_end_matches('/').is_empty());
    if matched && !everything {
        assert!(!is_ambiguous(path), "an ambiguous path matched: {path:?}");
    }
    // Without the header condition, the path alone decides.
    let path_only = RequestMatch::new(&RouteMatch {
        path: route.path.clone(),
        ..RouteMatch::default()
    })
    .expect("the same path condition compiles");
    let by_path = path_only.matches(&req);
    assert!(!matched || by_path);
    match &route.path {
        Some(PathMatch::Prefix(p)) => {
            let p = p.trim_end_matches('/');
            // `/` trims to the empty prefix: every path that starts with `/`.
            let expected = (p.is_empty() || !is_ambiguous(path))
                && (path == p || path.starts_with(&format!("{p}/")));
            assert_eq!(by_path, expected, "prefix {p:?} on {path:?}");
        }
        Some(PathMatch::Exact(e)) => {
            assert_eq!(
                by_path,
                !is_ambiguous(path) && path == e,
                "exact {e:?} on {path:?}"
            );
        }
        _ => {}
    }
    // A policy with the route as its only rule allows exactly what the route matches.
    let policy = Policy::new(
        "fuzz",
        &AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![AuthorizationRule {
                name: "r".into(),
                clients: vec![],
                unauthenticated: true,
                routes: vec![route],
            }],
        },
    )
    .expect("a compiling route compiles in a policy");
    assert_eq!(policy.decide(None, &req).is_ok(), matched);
});
