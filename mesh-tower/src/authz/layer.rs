use std::sync::Arc;

use arc_swap::ArcSwap;

use mesh_core::config::AuthorizationPolicy;
use tower::Layer;

use super::{Authorize, Policy, PolicyError};
use crate::decision::Recorder;
use crate::metrics::server::ListenerMetrics;
use prometheus_client::metrics::counter::Counter;

/// Authorizes requests by a [`Policy`]; see the [module docs](super). Clones, and every
/// service the layer makes, share the compiled policy, which [`PolicyHandle::replace`]
/// swaps atomically for all of them.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    handle: PolicyHandle,
    decisions: Option<Recorder>,
}

/// Replaces the policy of an [`AuthorizeLayer`] and of every service it made, at run time
/// (a configuration reload): requests already decided are unaffected, later ones are
/// judged by the new policy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PolicyHandle {
    current: Arc<ArcSwap<Compiled>>,
    metrics: Option<ListenerMetrics>,
    /// Told of each replacement, for what judges a connection once and keeps it open
    /// (an opaque relay, judged again).
    replaced: Arc<tokio::sync::watch::Sender<()>>,
}

/// A policy with its decision counters.
#[derive(Debug)]
pub(super) struct Compiled {
    pub(super) policy: Arc<Policy>,
    pub(super) counters: Option<Counters>,
}

impl PolicyHandle {
    fn compile(policy: Arc<Policy>, metrics: Option<&ListenerMetrics>) -> Compiled {
        let counters = metrics.map(|metrics| {
            let name = policy.name();
            Counters {
                rules: policy
                    .rule_names()
                    .map(|rule| metrics.authz_counter(name, Some(rule), "allow"))
                    .collect(),
                allow: metrics.authz_counter(name, None, "allow"),
                audit: metrics.authz_counter(name, None, "audit"),
                deny: metrics.authz_counter(name, None, "deny"),
            }
        });
        Compiled { policy, counters }
    }

    /// Judges every later request by `policy`; returns the policy it replaces.
    pub fn replace(&self, policy: Policy) -> Arc<Policy> {
        let next = Self::compile(Arc::new(policy), self.metrics.as_ref());
        let old = self.current.swap(Arc::new(next)).policy.clone();
        self.replaced.send_replace(());
        old
    }

    /// A receiver that sees each later [`replace`](Self::replace): what judged a
    /// long-lived connection by the policy in force can judge it again by the next.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.replaced.subscribe()
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load().policy.clone()
    }

    /// Runs `connection` (a long-lived one that `client` opened, judged when it began)
    /// to its end, judging it again by each policy that replaces the one in force:
    /// `None` once one denies it (`denied` is told which, to log and count it), and the
    /// connection's future is dropped. `replaced` must come from
    /// [`subscribe`](Self::subscribe) before the first judgement, so that no replacement
    /// goes unseen.
    #[cfg(feature = "opaque")]
    pub(crate) async fn until_denied<F: std::future::Future>(
        &self,
        connection: F,
        mut replaced: tokio::sync::watch::Receiver<()>,
        client: Option<&mesh_core::SpiffeId>,
        denied: impl FnOnce(&Policy),
    ) -> Option<F::Output> {
        let mut connection = std::pin::pin!(connection);
        loop {
            tokio::select! {
                biased;
                ended = &mut connection => return Some(ended),
                changed = replaced.changed() => {
                    if changed.is_err() {
                        // The handle is gone with its server: no more replacements.
                        return Some(connection.await);
                    }
                    let current = self.current();
                    if current.decide_connection(client).is_err() {
                        denied(&current);
                        return None;
                    }
                }
            }
        }
    }
}

/// The decision counters of one policy on one listener, made once.
#[derive(Debug)]
pub(super) struct Counters {
    pub(super) rules: Vec<Counter>,
    pub(super) allow: Counter,
    pub(super) audit: Counter,
    pub(super) deny: Counter,
}

impl AuthorizeLayer {
    /// Authorizes by `policy`.
    pub fn new(policy: Policy) -> Self {
        let compiled = PolicyHandle::compile(Arc::new(policy), None);
        Self {
            handle: PolicyHandle {
                current: Arc::new(ArcSwap::from_pointee(compiled)),
                metrics: None,
                replaced: Arc::new(tokio::sync::watch::Sender::new(())),
            },
            decisions: None,
        }
    }

    /// Counts decisions in `metrics` (`mesh_server_authz_total`), for this policy and
    /// the ones that replace it. Call it before making services.
    pub fn with_metrics(mut self, metrics: &ListenerMetrics) -> Self {
        let policy = self.handle.current();
        self.handle = PolicyHandle {
            current: Arc::new(ArcSwap::from_pointee(PolicyHandle::compile(
                policy,
                Some(metrics),
            ))),
            metrics: Some(metrics.clone()),
            replaced: Arc::new(tokio::sync::watch::Sender::new(())),
        };
        self
    }

    /// Records every decision — the client's identity, the method and path, the policy,
    /// the rule, allow / audit / deny — in `recorder`'s
    /// [decision record](crate::decision) (default: none). Call it before making
    /// services.
    pub fn with_decisions(mut self, recorder: Recorder) -> Self {
        self.decisions = Some(recorder);
        self
    }

    /// The handle that replaces the policy at run time.
    pub fn handle(&self) -> &PolicyHandle {
        &self.handle
    }

    /// Compiles the policy named `name` from its configuration.
    pub fn from_config(name: &str, config: &AuthorizationPolicy) -> Result<Self, PolicyError> {
        Policy::new(name, config).map(Self::new)
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.handle.current()
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize::new(inner, self.handle.current.clone()).recording(self.decisions.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mesh_core::config::DefaultAction;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_deny_and_an_allow_are_recorded() {
        use crate::decision::{AuthzVerdict, DecisionRecord, Kind};
        use mesh_core::config::AuthorizationRule;
        let record = DecisionRecord::new(8);
        let config = AuthorizationPolicy {
            default: DefaultAction::Deny,
            rules: vec![AuthorizationRule {
                name: "anyone".into(),
                clients: vec![],
                unauthenticated: true,
                routes: vec![mesh_core::config::RouteMatch {
                    path: Some(mesh_core::config::PathMatch::Prefix("/public".into())),
                    ..Default::default()
                }],
            }],
        };
        let layer = AuthorizeLayer::from_config("api", &config)
            .unwrap()
            .with_decisions(record.recorder("inbound"));
        let svc = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        let get = |path: &str| http::Request::get(path).body(()).unwrap();
        let denied = svc.clone().oneshot(get("/admin?token=x")).await.unwrap();
        assert_eq!(denied.status(), 403);
        let allowed = svc.oneshot(get("/public/a")).await.unwrap();
        assert_eq!(allowed.status(), 200);
        let got = record.of_kind(Kind::Authz);
        let deny = got[0].event.as_authz().unwrap();
        assert_eq!(deny.verdict, AuthzVerdict::Deny);
        assert_eq!(deny.client, None);
        assert_eq!(&*deny.policy, "api");
        assert_eq!(deny.rule, None);
        let line = got[0].to_string();
        assert!(line.starts_with("#0 +"), "{line}");
        assert!(
            line.ends_with("s inbound authz deny unauthenticated GET /admin by api/default"),
            "{line}"
        );
        let allow = got[1].event.as_authz().unwrap();
        assert_eq!(allow.verdict, AuthzVerdict::Allow);
        assert_eq!(allow.rule.as_deref(), Some("anyone"));
    }

    #[tokio::test]
    async fn a_replaced_policy_judges_every_later_request_of_every_service() {
        let layer = AuthorizeLayer::new(Policy::allow_all("open"));
        let svc = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        let status = |svc: Authorize<_>| async move {
            svc.oneshot(http::Request::new(())).await.unwrap().status()
        };
        assert_eq!(status(svc.clone()).await, 200);
        let closed = AuthorizationPolicy {
            default: DefaultAction::Deny,
            ..AuthorizationPolicy::default()
        };
        let old = layer
            .handle()
            .replace(Policy::new("closed", &closed).unwrap());
        assert_eq!(old.name(), "open");
        assert_eq!(status(svc.clone()).await, 403, "an existing service");
        assert_eq!(svc.policy().name(), "closed");
        let made_later = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        assert_eq!(
            made_later
                .oneshot(http::Request::new(()))
                .await
                .unwrap()
                .status(),
            403
        );
    }
}
