//! Authorization: which clients may call which routes.
//!
//! An [`AuthorizeLayer`] holds a [`Policy`] compiled once from a
//! [`mesh_core::config::AuthorizationPolicy`] (or built in code the same way). Each request
//! is judged by its peer's verified identity — the [`PeerIdentity`](mesh_spiffe::PeerIdentity)
//! request extension a mesh server sets from the client certificate; a request without
//! one is unauthenticated — and by its route:
//!
//! 1. The rules are tried in order. A rule admits a request when its client patterns
//!    match the identity (`unauthenticated = true` admits every caller, authenticated or
//!    not) **and** any of its route matches holds (no routes: every route). Route matches
//!    are [`matcher::RequestMatch`](crate::matcher::RequestMatch)es: path exact / prefix /
//!    regex, methods, headers, gRPC service and method; an ambiguous path (`..`, `//`,
//!    encoded separators) satisfies no path condition but the prefix `/`, which takes
//!    every path.
//! 2. The first rule that admits the request decides: the request goes on with an
//!    [`AuthzDecision`] extension naming the policy and the rule.
//! 3. When none does, the policy's default decides: `deny` (the default) refuses the
//!    request — HTTP 403, or for a gRPC request (`content-type: application/grpc…`) a
//!    trailers-only `PERMISSION_DENIED` — with a log line naming the client identity,
//!    the method, the path and the policy (at `info` once a second, saying how many went
//!    to `debug` since: a client sending denied requests without end cannot flood the
//!    log); `allow` lets it through with a decision whose rule is `None`; `audit` lets it
//!    through too, logs every one at `info`, and marks the decision
//!    [`is_audit`](AuthzDecision::is_audit).
//!
//! A decision allocates nothing but the extension's box: the rules are matched in place,
//! and the decision handed to the request is a clone of one made at compile time (two
//! reference counts).
//!
//! For opaque TCP, [`Policy::decide_connection`] judges a connection by its identity
//! alone, with the rules that hold for every route.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use mesh_core::config::{AuthorizationPolicy, AuthorizationRule, DefaultAction};
//! use mesh_tower::authz::{AuthorizeLayer, AuthzDecision};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let policy = AuthorizationPolicy {
//!     default: DefaultAction::Deny,
//!     rules: vec![AuthorizationRule {
//!         name: "prod".into(),
//!         clients: vec!["spiffe://example.org/ns/prod/*".parse()?],
//!         unauthenticated: false,
//!         routes: vec![],
//!     }],
//! };
//! let app = ServiceBuilder::new()
//!     .layer(AuthorizeLayer::from_config("api", &policy)?)
//!     .service(service_fn(|req: http::Request<()>| async move {
//!         let rule = req.extensions().get::<AuthzDecision>().and_then(|d| d.rule()).map(str::to_owned);
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(rule.unwrap_or_default()))))
//!     }));
//! // No verified identity: refused.
//! let resp = app.oneshot(http::Request::get("/users").body(())?).await?;
//! assert_eq!(resp.status(), http::StatusCode::FORBIDDEN);
//! # Ok(()) }
//! ```

mod error;
mod layer;
mod policy;
mod service;

pub use self::error::PolicyError;
pub use self::layer::{AuthorizeLayer, PolicyHandle};
pub use self::policy::{AuthzDecision, Denied, Policy};
pub use self::service::Authorize;
#[cfg(feature = "opaque")]
pub(crate) use self::service::Client;
pub use crate::body::ResponseFuture;
