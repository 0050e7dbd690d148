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
    exact: HashMap<String, Bucket>,
    /// Entries of routes with `*.suffix`, by `.suffix` (lowercase).
    wildcard: HashMap<String, Bucket>,
    /// The longest wildcard suffix, in labels: how far a lookup needs to go.
    wildcard_labels: usize,
    /// Entries of routes for any host.
    any: Bucket,
    names: Vec<Arc<str>>,
}

/// The entries of one hostname, most specific first; with many, an index by the first
/// path segment.
#[derive(Clone, Debug, Default)]
struct Bucket {
    entries: Vec<Entry>,
    index: Option<SegmentIndex>,
}

/// Which entries of a bucket a path may match, by its first segment: the positions of
/// entries that need that segment, and of those that take any, each ascending.
#[derive(Clone, Debug, Default)]
struct SegmentIndex {
    by_segment: HashMap<Box<str>, Box<[usize]>>,
    any_segment: Box<[usize]>,
}

/// Buckets with at least this many entries are indexed: below, a scan is as fast as a
/// hash of the segment.
const INDEX_FROM: usize = 16;

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
            any: Bucket::default(),
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
                table.any.entries.extend(entries());
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
                        .entries
                        .extend(entries());
                } else if host.is_empty() || host.contains('*') || host.len() > MAX_HOST {
                    return Err(RouteError::Host {
                        route: config.name.clone(),
                        host,
                    });
                } else {
                    table
                        .exact
                        .entry(host)
                        .or_default()
                        .entries
                        .extend(entries());
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
            bucket
                .entries
                .sort_by_key(|e| std::cmp::Reverse(e.matcher.specificity()));
            bucket.index = (bucket.entries.len() >= INDEX_FROM).then(|| index(&bucket.entries));
        }
        Ok(table)
    }

    /// The route for `req`: among the routes whose hostnames match (`Host` or
    /// `:authority`, port ignored, case-insensitive), the most specific hostname first
    /// (exact, then the longest wildcard, then routes for any host); within it, the
    /// most specific match.
    pub fn select<B>(&self, req: &Request<B>) -> Option<Selected<'_>> {
        let mut buf = [0u8; MAX_HOST];
        // Without routes for named hosts, only the routes for any host can take it: the
        // host need not be read at all.
        let by_host = !(self.exact.is_empty() && self.wildcard.is_empty());
        let host = by_host.then(|| request_host(req, &mut buf)).flatten();
        let exact = host.and_then(|h| self.exact.get(h));
        let wildcards = host.into_iter().flat_map(|h| self.wildcard_buckets(h));
        exact
            .into_iter()
            .chain(wildcards)
            .chain(std::iter::once(&self.any))
            .find_map(|bucket| bucket.find(req))
            .map(|e| Selected {
                route: e.route,
                name: &self.names[e.route],
                matched: e.index,
            })
    }

    /// The wildcard buckets that may hold `host`, longest suffix first: for
    /// `a.b.example.org`, `.b.example.org`, `.example.org`, `.org`.
    fn wildcard_buckets<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Bucket> + 'a {
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

impl Bucket {
    /// The first entry, in precedence order, that `req` matches: a scan, or with an
    /// index, a merge of the entries for the path's first segment and those for any.
    fn find<B>(&self, req: &Request<B>) -> Option<&Entry> {
        let Some(index) = &self.index else {
            return self.entries.iter().find(|e| e.matcher.matches(req));
        };
        let segment = crate::matcher::first_segment(req.uri().path())
            .and_then(|s| index.by_segment.get(s))
            .map_or(&[][..], |v| &v[..]);
        let (mut a, mut b) = (
            segment.iter().peekable(),
            index.any_segment.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => return None,
            };
            let entry = next.and_then(|&i| self.entries.get(i))?;
            if entry.matcher.matches(req) {
                return Some(entry);
            }
        }
    }
}

/// The index of a bucket's entries (in precedence order) by first path segment.
fn index(entries: &[Entry]) -> SegmentIndex {
    let mut by_segment: HashMap<Box<str>, Vec<usize>> = HashMap::new();
    let mut any_segment = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.matcher.first_segment() {
            Some(segment) => by_segment.entry(segment.into()).or_default().push(i),
            None => any_segment.push(i),
        }
    }
    SegmentIndex {
        by_segment: by_segment
            .into_iter()
            .map(|(k, v)| (k, v.into_boxed_slice()))
            .collect(),
        any_segment: any_segment.into_boxed_slice(),
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
