use std::sync::Arc;

use mesh_core::config::AuthorizationPolicy;
use tower::Layer;

use super::{Authorize, Policy, PolicyError};

/// Authorizes requests by a [`Policy`]; see the [module docs](super). Clones share the
/// compiled policy.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    policy: Arc<Policy>,
}

impl AuthorizeLayer {
    /// Authorizes by `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }

    /// Compiles the policy named `name` from its configuration.
    pub fn from_config(name: &str, config: &AuthorizationPolicy) -> Result<Self, PolicyError> {
        Policy::new(name, config).map(Self::new)
    }

    /// The compiled policy.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize::new(inner, self.policy.clone())
    }
}
