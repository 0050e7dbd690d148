//! The compiled authorization policy and its decisions.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, Method};
use mesh_core::config::{AuthorizationPolicy, DefaultAction};
use mesh_core::identity::{IdentityPattern, SpiffeId};

use super::error::PolicyError;
use crate::matcher::RequestMatch;

/// An authorization policy compiled for the request path: rules in order, each a set of
/// client patterns and compiled route matches; see the [module docs](super).
///
/// ```
/// use mesh_core::config::{AuthorizationPolicy, AuthorizationRule, DefaultAction, PathMatch, RouteMatch};
/// use mesh_tower::authz::Policy;
///
/// let policy = Policy::new("api", &AuthorizationPolicy {
///     default: DefaultAction::Deny,
///     rules: vec![AuthorizationRule {
///         name: "health".into(),
///         clients: vec![],
///         unauthenticated: true,
///         routes: vec![RouteMatch { path: Some(PathMatch::Exact("/healthz".into())), ..Default::default() }],
///     }],
/// })?;
/// let health = http::Request::get("/healthz").body(())?;
/// assert_eq!(policy.decide(None, &health).unwrap().rule(), Some("health"));
/// let other = http::Request::get("/users").body(())?;
/// assert!(policy.decide(None, &other).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Policy {
    name: Arc<str>,
    default: DefaultAction,
    rules: Vec<Rule>,
    /// The decision when no rule matches and the default allows (or audits).
    by_default: AuthzDecision,
    /// For policies of many rules: which rules can admit a client at all.
    index: Option<ClientIndex>,
}

/// Rules by the clients they can admit, so that a decision among many rules looks only
/// at the rules that name its client (still in their order).
#[derive(Debug)]
struct ClientIndex {
    /// Rules open to unauthenticated callers (and so to every caller).
    open: Vec<usize>,
    /// Rules with a pattern other than an exact identity (or open ones).
    patterns: Vec<usize>,
    /// Rules that name an identity exactly, by identity.
    exact: std::collections::HashMap<SpiffeId, Vec<usize>>,
}

/// From this many rules on, decisions go through a [`ClientIndex`].
const INDEX_FROM: usize = 16;

impl ClientIndex {
    fn new(rules: &[Rule]) -> Self {
        let mut index = Self {
            open: Vec::new(),
            patterns: Vec::new(),
            exact: std::collections::HashMap::new(),
        };
        for (i, rule) in rules.iter().enumerate() {
            if rule.unauthenticated {
                index.open.push(i);
                index.patterns.push(i);
                continue;
            }
            if rule
                .clients
                .iter()
                .any(|c| !matches!(c, IdentityPattern::Exact(_)))
            {
                index.patterns.push(i);
            }
            for client in &rule.clients {
                if let IdentityPattern::Exact(id) = client {
                    let rules = index.exact.entry(id.clone()).or_default();
                    if rules.last() != Some(&i) {
                        rules.push(i);
                    }
                }
            }
        }
        index
    }

    /// The rules that may admit `client`, in order: the two sorted lists merged.
    fn candidates<'a>(&'a self, client: Option<&SpiffeId>) -> impl Iterator<Item = usize> + 'a {
        let (mut a, mut b): (&[usize], &[usize]) = match client {
            None => (&self.open, &[]),
            Some(id) => (
                &self.patterns,
                self.exact.get(id).map_or(&[][..], Vec::as_slice),
            ),
        };
        std::iter::from_fn(move || {
            let next = match (a.first(), b.first()) {
                (Some(&x), Some(&y)) if x == y => {
                    (a, b) = (&a[1..], &b[1..]);
                    x
                }
                (Some(&x), Some(&y)) if x < y => {
                    a = &a[1..];
                    x
                }
                (_, Some(&y)) => {
                    b = &b[1..];
                    y
                }
                (Some(&x), None) => {
                    a = &a[1..];
                    x
                }
                (None, None) => return None,
            };
            Some(next)
        })
    }
}

#[derive(Debug)]
struct Rule {
    clients: Vec<IdentityPattern>,
    unauthenticated: bool,
    /// Empty: every route.
    routes: Vec<RequestMatch>,
    decision: AuthzDecision,
}

impl Rule {
    fn admits_client(&self, client: Option<&SpiffeId>) -> bool {
        // A rule open to unauthenticated callers is open to authenticated ones too: they
        // are no less trusted.
        self.unauthenticated || client.is_some_and(|id| self.clients.iter().any(|p| p.matches(id)))
    }
}

/// Which rule let a request in, as a request extension next to the peer's
/// `PeerIdentity`: handlers read it, clients cannot forge it (it is never read from
/// headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzDecision {
    policy: Arc<str>,
    /// `None`: no rule matched, and the policy's default allowed the request.
    rule: Option<Arc<str>>,
    audit: bool,
    /// The rule's position, for its counters.
    pub(super) index: Option<usize>,
}

impl AuthzDecision {
    /// The policy's name.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The rule that allowed the request, or `None` when the default did.
    pub fn rule(&self) -> Option<&str> {
        self.rule.as_deref()
    }

    /// Whether the request was let in only because the policy audits: no rule allows it,
    /// and under `deny` it would have been refused.
    pub fn is_audit(&self) -> bool {
        self.audit
    }

    /// The policy's and the rule's shared names, for the decision record.
    pub(super) fn names(&self) -> (Arc<str>, Option<Arc<str>>) {
        (self.policy.clone(), self.rule.clone())
    }
}

impl fmt::Display for AuthzDecision {
    /// `policy/rule`, or `policy/default` (`policy/default (audit)`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "{}/{rule}", self.policy),
            None if self.audit => write!(f, "{}/default (audit)", self.policy),
            None => write!(f, "{}/default", self.policy),
        }
    }
}

/// A request (or connection) the policy refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no rule of authorization policy `{policy}` allows this client")]
pub struct Denied {
    policy: Arc<str>,
}

impl Denied {
    /// The policy's name.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The policy's shared name, for the decision record.
    pub(super) fn policy_name(&self) -> Arc<str> {
        self.policy.clone()
    }
}

impl Policy {
    /// Compiles the policy named `name` (for logs, metrics and decisions).
    pub fn new(name: &str, config: &AuthorizationPolicy) -> Result<Self, PolicyError> {
        let name: Arc<str> = Arc::from(name);
        let rules = config
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let routes = rule
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(route, m)| {
                        RequestMatch::new(m).map_err(|source| PolicyError {
                            policy: name.to_string(),
                            rule: rule.name.clone(),
                            index,
                            route,
                            source,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Rule {
                    clients: rule.clients.clone(),
                    unauthenticated: rule.unauthenticated,
                    routes,
                    decision: AuthzDecision {
                        policy: name.clone(),
                        rule: Some(Arc::from(rule.name.as_str())),
                        audit: false,
                        index: Some(index),
                    },
                })
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        Ok(Self {
            index: (rules.len() >= INDEX_FROM).then(|| ClientIndex::new(&rules)),
            by_default: AuthzDecision {
                policy: name.clone(),
                rule: None,
                audit: config.default == DefaultAction::Audit,
                index: None,
            },
            name,
            default: config.default,
            rules,
        })
    }

    /// A policy that allows every request (by default, with no rules): what a server
    /// without a policy does.
    pub fn allow_all(name: &str) -> Self {
        let name: Arc<str> = Arc::from(name);
        Self {
            by_default: AuthzDecision {
                policy: name.clone(),
                rule: None,
                audit: false,
                index: None,
            },
            name,
            default: DefaultAction::Allow,
            rules: Vec::new(),
            index: None,
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rules' names, in order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter_map(|r| r.decision.rule())
    }

    /// The decision on a request from `client` (`None`: unauthenticated): the first rule
    /// that admits both the client and the request, else the default. An HTTP/2
    /// extended CONNECT is judged as the `GET` it stands for
    /// ([`crate::upgrade::request_method`]).
    pub fn decide<B>(
        &self,
        client: Option<&SpiffeId>,
        req: &http::Request<B>,
    ) -> Result<&AuthzDecision, Denied> {
        self.decide_parts(
            client,
            crate::upgrade::request_method(req),
            req.uri(),
            req.headers(),
        )
    }

    /// [`decide`](Self::decide) on a request's parts.
    pub fn decide_parts(
        &self,
        client: Option<&SpiffeId>,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<&AuthzDecision, Denied> {
        let admits = |rule: &&Rule| {
            rule.admits_client(client)
                && (rule.routes.is_empty()
                    || rule
                        .routes
                        .iter()
                        .any(|m| m.matches_parts(method, uri, headers)))
        };
        let rule = match &self.index {
            Some(index) => index
                .candidates(client)
                .filter_map(|i| self.rules.get(i))
                .find(admits),
            None => self.rules.iter().find(admits),
        };
        match rule {
            Some(rule) => Ok(&rule.decision),
            None => self.fallback(),
        }
    }

    /// The decision on an opaque connection from `client`, before any request: only
    /// rules that hold for every route apply (one with route conditions cannot be judged
    /// without a request, so it does not admit the connection).
    pub fn decide_connection(&self, client: Option<&SpiffeId>) -> Result<&AuthzDecision, Denied> {
        let rule = self.rules.iter().find(|rule| {
            rule.admits_client(client)
                && (rule.routes.is_empty() || rule.routes.iter().any(RequestMatch::is_any))
        });
        match rule {
            Some(rule) => Ok(&rule.decision),
            None => self.fallback(),
        }
    }

    fn fallback(&self) -> Result<&AuthzDecision, Denied> {
        match self.default {
            DefaultAction::Allow | DefaultAction::Audit => Ok(&self.by_default),
            // Deny, and any action added later: fail closed.
            _ => Err(Denied {
                policy: self.name.clone(),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_core::config::{AuthorizationRule, PathMatch, RouteMatch};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn rule(
        name: &str,
        clients: &[&str],
        unauthenticated: bool,
        prefix: Option<&str>,
    ) -> AuthorizationRule {
        AuthorizationRule {
            name: name.into(),
            clients: clients.iter().map(|c| c.parse().unwrap()).collect(),
            unauthenticated,
            routes: prefix
                .map(|p| {
                    vec![RouteMatch {
                        path: Some(PathMatch::Prefix(p.into())),
                        ..RouteMatch::default()
                    }]
                })
                .unwrap_or_default(),
        }
    }

    fn policy(default: DefaultAction, rules: Vec<AuthorizationRule>) -> Policy {
        Policy::new("api", &AuthorizationPolicy { default, rules }).unwrap()
    }

    fn get(path: &str) -> http::Request<()> {
        http::Request::get(path).body(()).unwrap()
    }

    #[test]
    fn the_first_rule_admitting_client_and_route_decides() {
        let p = policy(
            DefaultAction::Deny,
            vec![
                rule("ops", &["spiffe://example.org/ns/ops/*"], false, None),
                rule(
                    "web-users",
                    &["spiffe://example.org/ns/prod/sa/web"],
                    false,
                    Some("/users"),
                ),
                rule(
                    "any-users",
                    &["spiffe://example.org/*"],
                    false,
                    Some("/users"),
                ),
                rule("health", &[], true, Some("/healthz")),
            ],
        );
        let web = id("spiffe://example.org/ns/prod/sa/web");
        let ops = id("spiffe://example.org/ns/ops/sa/admin");
        let other = id("spiffe://example.org/ns/prod/sa/batch");
        let foreign = id("spiffe://other.org/ns/prod/sa/web");
        let rule_of = |client: Option<&SpiffeId>, path: &str| {
            p.decide(client, &get(path))
                .ok()
                .map(|d| d.rule().unwrap().to_owned())
        };
        assert_eq!(
            rule_of(Some(&web), "/users/1").as_deref(),
            Some("web-users")
        );
        assert_eq!(
            rule_of(Some(&other), "/users/1").as_deref(),
            Some("any-users")
        );
        assert_eq!(rule_of(Some(&ops), "/anything").as_deref(), Some("ops"));
        assert_eq!(rule_of(Some(&web), "/billing"), None);
        assert_eq!(rule_of(Some(&foreign), "/users/1"), None);
        assert_eq!(rule_of(None, "/users/1"), None);
        // Open to unauthenticated callers means open to authenticated ones too.
        assert_eq!(rule_of(None, "/healthz").as_deref(), Some("health"));
        assert_eq!(
            rule_of(Some(&foreign), "/healthz").as_deref(),
            Some("health")
        );
        let denied = p.decide(Some(&web), &get("/billing")).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "no rule of authorization policy `api` allows this client"
        );
    }

    #[test]
    fn defaults_allow_audit_and_deny() {
        let rules = || {
            vec![rule(
                "web",
                &["spiffe://example.org/ns/prod/sa/web"],
                false,
                None,
            )]
        };
        let other = id("spiffe://example.org/ns/prod/sa/batch");
        let allow = policy(DefaultAction::Allow, rules());
        let d = allow.decide(Some(&other), &get("/")).unwrap();
        assert_eq!(
            (d.rule(), d.is_audit(), d.to_string().as_str()),
            (None, false, "api/default")
        );
        let audit = policy(DefaultAction::Audit, rules());
        let d = audit.decide(Some(&other), &get("/")).unwrap();
        assert_eq!(
            (d.rule(), d.is_audit(), d.to_string().as_str()),
            (None, true, "api/default (audit)")
        );
        // A matching rule is no audit.
        let web = id("spiffe://example.org/ns/prod/sa/web");
        assert!(!audit.decide(Some(&web), &get("/")).unwrap().is_audit());
        assert!(
            policy(DefaultAction::Deny, rules())
                .decide(Some(&other), &get("/"))
                .is_err()
        );
        assert!(
            policy(DefaultAction::Deny, vec![])
                .decide(None, &get("/"))
                .is_err()
        );
        assert!(Policy::allow_all("open").decide(None, &get("/")).is_ok());
    }

    #[test]
    fn connections_are_judged_by_rules_that_hold_for_every_route() {
        let p = policy(
            DefaultAction::Deny,
            vec![
                rule(
                    "web-users",
                    &["spiffe://example.org/ns/prod/sa/web"],
                    false,
                    Some("/users"),
                ),
                rule(
                    "db-clients",
                    &["spiffe://example.org/ns/prod/*"],
                    false,
                    None,
                ),
            ],
        );
        let web = id("spiffe://example.org/ns/prod/sa/web");
        assert_eq!(
            p.decide_connection(Some(&web)).unwrap().rule(),
            Some("db-clients")
        );
        assert!(
            p.decide_connection(Some(&id("spiffe://example.org/ns/dev/sa/web")))
                .is_err()
        );
        assert!(p.decide_connection(None).is_err());
        let only_routes = policy(
            DefaultAction::Deny,
            vec![rule(
                "web-users",
                &["spiffe://example.org/ns/prod/sa/web"],
                false,
                Some("/users"),
            )],
        );
        assert!(only_routes.decide_connection(Some(&web)).is_err());
    }

    proptest::proptest! {
        /// With the client index (many rules) or without, the same rule decides.
        #[test]
        fn the_index_decides_as_the_scan_does(
            rules in proptest::collection::vec((0usize..6, proptest::bool::ANY, 0usize..3), 0..40),
            client in proptest::option::of(0usize..6),
            path in 0usize..3,
        ) {
            let ids = |i: usize| format!("spiffe://example.org/ns/n{}/sa/s{i}", i % 2);
            let config = AuthorizationPolicy {
                default: DefaultAction::Deny,
                rules: rules
                    .iter()
                    .enumerate()
                    .map(|(k, &(who, open, route))| {
                        let clients = match who {
                            0 => vec!["*".into()],
                            1 => vec!["spiffe://example.org/ns/n1/*".into()],
                            w => vec![ids(w), ids(w + 1)],
                        };
                        AuthorizationRule {
                            name: format!("r{k}"),
                            clients: clients.iter().map(|c| c.parse().unwrap()).collect(),
                            unauthenticated: open,
                            routes: match route {
                                0 => vec![],
                                r => vec![RouteMatch {
                                    path: Some(PathMatch::Prefix(format!("/p{r}"))),
                                    ..RouteMatch::default()
                                }],
                            },
                        }
                    })
                    .collect(),
            };
            let mut indexed = Policy::new("p", &config).unwrap();
            indexed.index = Some(ClientIndex::new(&indexed.rules));
            let mut scanned = Policy::new("p", &config).unwrap();
            scanned.index = None;
            let client = client.map(|c| id(&ids(c)));
            let req = get(&format!("/p{path}/x"));
            let a = indexed.decide(client.as_ref(), &req).ok().and_then(|d| d.rule().map(str::to_owned));
            let b = scanned.decide(client.as_ref(), &req).ok().and_then(|d| d.rule().map(str::to_owned));
            proptest::prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn a_bad_route_names_its_rule() {
        let mut bad = rule("broken", &["*"], false, None);
        bad.routes = vec![RouteMatch {
            path: Some(PathMatch::Regex("(".into())),
            ..RouteMatch::default()
        }];
        let e = Policy::new(
            "api",
            &AuthorizationPolicy {
                default: DefaultAction::Deny,
                rules: vec![bad],
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "authorization policy `api`, rule `broken` (rules[0].routes[0]): invalid regex"
            ),
            "{e}"
        );
    }
}
