//! Which verified peers a connection accepts.
//!
//! An [`Authorizer`] runs after the peer's chain has verified against its trust domain's
//! bundle. Use the narrowest that fits: a client dialing an endpoint expects that
//! endpoint's [`exact`](Authorizer::exact) identity; a server accepting any workload of
//! its own domain uses [`trust_domain`](Authorizer::trust_domain); finer per-route
//! decisions belong to the authorization middleware, which sees the peer's identity as a
//! request extension.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::error::VerifyError;
use mesh_core::identity::{IdentityPattern, SpiffeId, TrustDomain};

/// A rule over verified SPIFFE IDs.
///
/// ```
/// use mesh_spiffe::Authorizer;
/// use mesh_core::identity::SpiffeId;
///
/// let web = SpiffeId::new("spiffe://example.org/ns/prod/sa/web")?;
/// assert!(Authorizer::pattern("spiffe://example.org/ns/prod/*".parse()?).authorize(&web).is_ok());
/// let err = Authorizer::exact(SpiffeId::new("spiffe://example.org/db")?).authorize(&web).unwrap_err();
/// assert!(err.to_string().contains("not authorized"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Authorizer(Rule);

#[derive(Clone)]
enum Rule {
    Any,
    Exact(SpiffeId),
    OneOf(Arc<HashSet<SpiffeId>>),
    TrustDomain(TrustDomain),
    Pattern(IdentityPattern),
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>, Arc<str>),
}

impl Authorizer {
    /// Any identity whose chain verified against a held bundle.
    pub fn any() -> Self {
        Self(Rule::Any)
    }

    /// Exactly `id`.
    pub fn exact(id: SpiffeId) -> Self {
        Self(Rule::Exact(id))
    }

    /// Any of `ids`.
    pub fn one_of(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self(Rule::OneOf(Arc::new(ids.into_iter().collect())))
    }

    /// Any identity in `trust_domain`.
    pub fn trust_domain(trust_domain: TrustDomain) -> Self {
        Self(Rule::TrustDomain(trust_domain))
    }

    /// Identities that `pattern` matches.
    pub fn pattern(pattern: IdentityPattern) -> Self {
        Self(Rule::Pattern(pattern))
    }

    /// Identities for which `predicate` returns true; `description` names the rule in
    /// errors ("expected {description}").
    pub fn predicate(
        description: impl Into<Arc<str>>,
        predicate: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self(Rule::Predicate(Arc::new(predicate), description.into()))
    }

    /// Accepts `id` or says why not.
    pub fn authorize(&self, id: &SpiffeId) -> Result<(), VerifyError> {
        let ok = match &self.0 {
            Rule::Any => true,
            Rule::Exact(expected) => expected == id,
            Rule::OneOf(set) => set.contains(id),
            Rule::TrustDomain(td) => id.is_member_of(td),
            Rule::Pattern(p) => p.matches(id),
            Rule::Predicate(f, _) => f(id),
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::Unauthorized {
                id: id.clone(),
                expected: self.to_string(),
            })
        }
    }
}

impl From<IdentityPattern> for Authorizer {
    fn from(pattern: IdentityPattern) -> Self {
        Self::pattern(pattern)
    }
}

impl From<SpiffeId> for Authorizer {
    fn from(id: SpiffeId) -> Self {
        Self::exact(id)
    }
}

impl fmt::Display for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Rule::Any => f.write_str("any identity from a trusted domain"),
            Rule::Exact(id) => write!(f, "`{id}`"),
            Rule::OneOf(set) => {
                let mut ids: Vec<String> = set.iter().map(|id| format!("`{id}`")).collect();
                ids.sort();
                write!(f, "one of {}", ids.join(", "))
            }
            Rule::TrustDomain(td) => write!(f, "an identity in trust domain `{td}`"),
            Rule::Pattern(p) => write!(f, "an identity matching `{p}`"),
            Rule::Predicate(_, description) => f.write_str(description),
        }
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Authorizer({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn each_rule() {
        let web = id("spiffe://example.org/web");
        let db = id("spiffe://example.org/db");
        let other = id("spiffe://other.org/web");
        let td = TrustDomain::new("example.org").unwrap();
        let cases: Vec<(Authorizer, [bool; 3])> = vec![
            (Authorizer::any(), [true, true, true]),
            (Authorizer::exact(web.clone()), [true, false, false]),
            (
                Authorizer::one_of([web.clone(), other.clone()]),
                [true, false, true],
            ),
            (Authorizer::trust_domain(td), [true, true, false]),
            (
                Authorizer::pattern("spiffe://example.org/*".parse().unwrap()),
                [true, true, false],
            ),
            (
                Authorizer::predicate("a web workload", |id| id.path() == "/web"),
                [true, false, true],
            ),
        ];
        for (authorizer, expect) in cases {
            for (peer, want) in [&web, &db, &other].into_iter().zip(expect) {
                assert_eq!(
                    authorizer.authorize(peer).is_ok(),
                    want,
                    "{authorizer} / {peer}"
                );
            }
        }
    }

    #[test]
    fn refusals_name_the_peer_and_the_rule() {
        let err = Authorizer::one_of([id("spiffe://a.org/x"), id("spiffe://a.org/y")])
            .authorize(&id("spiffe://a.org/z"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "peer identity `spiffe://a.org/z` is not authorized (expected one of `spiffe://a.org/x`, `spiffe://a.org/y`)"
        );
        let err = Authorizer::predicate("a friend", |_| false)
            .authorize(&id("spiffe://a.org/z"))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("(expected a friend)"), "{err}");
    }
}
