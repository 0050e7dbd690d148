//! The compiled route table: matches ordered by Gateway API precedence, bucketed by
//! hostname.

use std::collections::HashMap;
use std::sync::Arc;

use http::Request;
use mesh_core::config::RouteConfig;

use super::error::RouteError;
use crate::matcher::RequestMatch;

/// A set of routes compiled for selection; see the [module docs](super).
#[derive(Clone, Debug)]
pub struct RouteTable {
    /// Entries of routes naming the host exactly, by lowercase host.
    exact: HashMap<String, Vec<Entry>>,
    /// Entries of routes with `*.suffix`, by `.suffix` (lowercase).
    wildcard: HashMap<String, Vec<Entry>>,
    /// The longest wildcard suffix, in labels: how far a lookup needs to go.
    wildcard_labels: usize,
    /// Entries of routes for any host.
    any: Vec<Entry>,
    names: Vec<Arc<str>>,
}

#[derive(Clone, Debug)]
struct Entry {
    route: usize,
    index: usize,
    matcher: RequestMatch,
}

/// The route a request selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected<'a> {
    /// The route's position in the table's configuration.
    pub route: usize,
    /// The route's name.
    pub name: &'a str,
    /// Which of the route's matches held (0 for a route without matches).
    pub matched: usize,
}

/// The longest a hostname may be (RFC 1035).
const MAX_HOST: usize = 253;

impl RouteTable {
    /// Compiles `routes`; an error names the route and what is wrong.
    pub fn new(routes: &[RouteConfig]) -> Result<Self, RouteError> {
        let mut table = Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            wildcard_labels: 0,
            any: Vec::new(),
            names: routes.iter().map(|r| Arc::from(r.name.as_str())).collect(),
        };
        for (route, config) in routes.iter().enumerate() {
            let matchers = if config.matches.is_empty() {
                vec![RequestMatch::any()]
            } else {
                config
                    .matches
                    .iter()
                    .enumerate()
                    .map(|(index, m)| {
                        RequestMatch::new(m).map_err(|source| RouteError::Match {
                            route: config.name.clone(),
                            index,
                            source,
                        })
                    })
                    .collect::<Result<_, _>>()?
            };
            let entries = || {
                matchers.iter().enumerate().map(move |(index, m)| Entry {
                    route,
                    index,
                    matcher: m.clone(),
                })
            };
            if config.hosts.is_empty() {
                table.any.extend(entries());
            }
            for host in &config.hosts {
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                if let Some(suffix) = host.strip_prefix('*') {
                    if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                        return Err(RouteError::Host {
                            route: config.name.clone(),
                            host,
                        });
                    }
                    table.wildcard_labels = table.wildcard_labels.max(suffix.matches('.').count());
                    table
                        .wildcard
                        .entry(suffix.to_owned())
                        .or_default()
                        .extend(entries());
                } else if host.is_empty() || host.contains('*') || host.len() > MAX_HOST {
                    return Err(RouteError::Host {
                        route: config.name.clone(),
                        host,
                    });
                } else {
                    table.exact.entry(host).or_default().extend(entries());
                }
            }
        }
        for bucket in table
            .exact
            .values_mut()
            .chain(table.wildcard.values_mut())
            .chain(std::iter::once(&mut table.any))
        {
            // Most specific first; ties keep route order, then match order (stable).
            bucket.sort_by_key(|e| std::cmp::Reverse(e.matcher.specificity()));
        }
        Ok(table)
    }

    /// The route for `req`: among the routes whose hostnames match (`Host` or
    /// `:authority`, port ignored, case-insensitive), the most specific hostname first
    /// (exact, then the longest wildcard, then routes for any host); within it, the
    /// most specific match.
    pub fn select<B>(&self, req: &Request<B>) -> Option<Selected<'_>> {
        let mut buf = [0u8; MAX_HOST];
        let host = request_host(req, &mut buf);
        let exact = host.and_then(|h| self.exact.get(h));
        let wildcards = host.into_iter().flat_map(|h| self.wildcard_buckets(h));
        exact
            .into_iter()
            .chain(wildcards)
            .chain(std::iter::once(&self.any))
            .find_map(|bucket| bucket.iter().find(|e| e.matcher.matches(req)))
            .map(|e| Selected {
                route: e.route,
                name: &self.names[e.route],
                matched: e.index,
            })
    }

    /// The wildcard buckets that may hold `host`, longest suffix first: for
    /// `a.b.example.org`, `.b.example.org`, `.example.org`, `.org`.
    fn wildcard_buckets<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vec<Entry>> + 'a {
        host.match_indices('.')
            .map(move |(i, _)| &host[i..])
            .filter(move |suffix| suffix.matches('.').count() <= self.wildcard_labels)
            .filter_map(move |suffix| self.wildcard.get(suffix))
    }

    /// The routes' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }
}

/// The request's host, lowercased into `buf`, without its port: from the URI (HTTP/2's
/// `:authority`, or an absolute-form request), else the `Host` header.
fn request_host<'b, B>(req: &Request<B>, buf: &'b mut [u8; MAX_HOST]) -> Option<&'b str> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => {
            let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
            // `host:port`, or `[v6]:port`.
            match host.rfind(':') {
                Some(i) if !host[i..].contains(']') => &host[..i],
                _ => host,
            }
        }
    };
    // One trailing dot (a fully qualified name) is the same name. A name with an empty
    // label (`.example.org`, `a..example.org`) is no hostname: no wildcard may take it
    // as a label, so it gets the routes for any host only.
    let raw = raw.strip_suffix('.').unwrap_or(raw);
    if raw.is_empty() || raw.len() > MAX_HOST || raw.starts_with('.') || raw.contains("..") {
        return None;
    }
    let out = &mut buf[..raw.len()];
    out.copy_from_slice(raw.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}
