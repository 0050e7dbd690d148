//! Workload identities and the patterns that select them.
//!
//! Identities are SPIFFE IDs (`spiffe://trust-domain/path`), re-exported from the
//! [`spiffe`] crate so that every mesh crate agrees on one validated type.
//!
//! An [`IdentityPattern`] selects a set of identities. Authorization rules and expected
//! peers are written with them. The syntax, checked when a pattern is parsed:
//!
//! | pattern | matches |
//! |---|---|
//! | `spiffe://example.org/ns/prod/sa/web` | exactly that ID |
//! | `spiffe://example.org/ns/prod/*` | any ID whose path lies *under* `/ns/prod` (`/ns/prod/sa/web`, `/ns/prod/a/b`), but not `/ns/prod` itself nor `/ns/production` |
//! | `spiffe://example.org/*` | any ID in the trust domain `example.org` |
//! | `*` | any authenticated identity, from any trusted domain |
//!
//! A wildcard is only allowed as the whole last path segment; a bare trust domain
//! (`spiffe://example.org`) is refused as ambiguous, with a hint to write
//! `spiffe://example.org/*`. Trust domains compare case-insensitively (they are stored
//! lowercase); paths compare exactly.
//!
//! Matching never allocates: a prefix pattern keeps its prefix with the trailing `/`, so a
//! match is one trust-domain comparison and one `starts_with`.
//!
//! ```
//! use mesh_core::identity::{IdentityPattern, SpiffeId};
//!
//! let pattern: IdentityPattern = "spiffe://example.org/ns/prod/*".parse()?;
//! let web = SpiffeId::new("spiffe://example.org/ns/prod/sa/web")?;
//! let dev = SpiffeId::new("spiffe://example.org/ns/dev/sa/web")?;
//! assert!(pattern.matches(&web));
//! assert!(!pattern.matches(&dev));
//!
//! let err = "spiffe://example.org/ns/*/sa/web".parse::<IdentityPattern>().unwrap_err();
//! assert!(err.to_string().contains("last path segment"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

const SCHEME: &str = "spiffe://";

/// A set of SPIFFE identities, written as a string (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum IdentityPattern {
    /// Any authenticated identity, from any trusted domain: `*`.
    Any,
    /// Any identity in one trust domain: `spiffe://example.org/*`.
    TrustDomain(TrustDomain),
    /// Any identity in a trust domain whose path lies under a prefix:
    /// `spiffe://example.org/ns/prod/*`.
    PathPrefix(PathPrefix),
    /// Exactly one identity.
    Exact(SpiffeId),
}

/// The trust domain and path prefix of an [`IdentityPattern::PathPrefix`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathPrefix {
    trust_domain: TrustDomain,
    /// The prefix, always with a leading and a trailing `/` (`/ns/prod/`).
    prefix: String,
}

impl PathPrefix {
    /// The trust domain the pattern is confined to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path prefix, with its leading and trailing `/` (`/ns/prod/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl IdentityPattern {
    /// Returns whether `id` belongs to the set this pattern selects.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::TrustDomain(td) => id.is_member_of(td),
            Self::PathPrefix(p) => {
                id.is_member_of(&p.trust_domain) && id.path().starts_with(&p.prefix)
            }
            Self::Exact(exact) => exact == id,
        }
    }

    /// The trust domain this pattern is confined to, or `None` for [`IdentityPattern::Any`].
    pub fn trust_domain(&self) -> Option<&TrustDomain> {
        match self {
            Self::Any => None,
            Self::TrustDomain(td) => Some(td),
            Self::PathPrefix(p) => Some(&p.trust_domain),
            Self::Exact(id) => Some(id.trust_domain()),
        }
    }
}

impl From<SpiffeId> for IdentityPattern {
    fn from(id: SpiffeId) -> Self {
        Self::Exact(id)
    }
}

impl From<TrustDomain> for IdentityPattern {
    fn from(td: TrustDomain) -> Self {
        Self::TrustDomain(td)
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::TrustDomain(td) => write!(f, "{SCHEME}{td}/*"),
            Self::PathPrefix(p) => write!(f, "{SCHEME}{}{}*", p.trust_domain, p.prefix),
            Self::Exact(id) => fmt::Display::fmt(id, f),
        }
    }
}

/// Why a string is not an [`IdentityPattern`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern is empty.
    #[error("identity pattern is empty")]
    Empty,
    /// The pattern does not start with `spiffe://` (and is not `*`).
    #[error("identity pattern `{0}` must be `*` or start with `spiffe://`")]
    NotSpiffe(String),
    /// The pattern names a trust domain with no path, which is ambiguous.
    #[error("identity pattern `{0}` names only a trust domain; write `{0}/*` for any ID in it")]
    BareTrustDomain(String),
    /// A `*` appears somewhere other than as the whole last path segment.
    #[error(
        "identity pattern `{0}`: a wildcard `*` is only allowed as the whole last path segment"
    )]
    MisplacedWildcard(String),
    /// The trust domain or path is not valid SPIFFE syntax.
    #[error("identity pattern `{pattern}`: {source}")]
    InvalidId {
        /// The pattern as written.
        pattern: String,
        /// What the SPIFFE ID parser refused.
        #[source]
        source: SpiffeIdError,
    },
}

impl FromStr for IdentityPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let Some(rest) = strip_scheme(s) else {
            return Err(PatternError::NotSpiffe(s.to_owned()));
        };
        let invalid = |source| PatternError::InvalidId {
            pattern: s.to_owned(),
            source,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => {
                if rest.contains('*') {
                    return Err(PatternError::MisplacedWildcard(s.to_owned()));
                }
                return Err(PatternError::BareTrustDomain(s.to_owned()));
            }
        };
        if authority.contains('*') {
            return Err(PatternError::MisplacedWildcard(s.to_owned()));
        }
        match path.strip_suffix("/*") {
            Some(prefix) => {
                if prefix.contains('*') {
                    return Err(PatternError::MisplacedWildcard(s.to_owned()));
                }
                let trust_domain = TrustDomain::new(authority).map_err(invalid)?;
                if prefix.is_empty() {
                    return Ok(Self::TrustDomain(trust_domain));
                }
                // Validate the prefix's segments with the SPIFFE ID parser itself.
                let id = SpiffeId::new(format!("{SCHEME}{authority}{prefix}")).map_err(invalid)?;
                Ok(Self::PathPrefix(PathPrefix {
                    trust_domain,
                    prefix: format!("{}/", id.path()),
                }))
            }
            None => {
                if path.contains('*') {
                    return Err(PatternError::MisplacedWildcard(s.to_owned()));
                }
                if path == "/" {
                    return Err(PatternError::BareTrustDomain(
                        s.trim_end_matches('/').to_owned(),
                    ));
                }
                SpiffeId::new(format!("{SCHEME}{rest}"))
                    .map(Self::Exact)
                    .map_err(invalid)
            }
        }
    }
}

/// Strips a case-insensitive `spiffe://` scheme.
fn strip_scheme(s: &str) -> Option<&str> {
    let head = s.get(..SCHEME.len())?;
    head.eq_ignore_ascii_case(SCHEME)
        .then(|| &s[SCHEME.len()..])
}

impl serde::Serialize for IdentityPattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IdentityPattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::serde_str::deserialize(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn parses_each_form() {
        assert_eq!(
            "*".parse::<IdentityPattern>().unwrap(),
            IdentityPattern::Any
        );
        assert_eq!(
            "spiffe://Example.org/*".parse::<IdentityPattern>().unwrap(),
            IdentityPattern::TrustDomain(TrustDomain::new("example.org").unwrap())
        );
        let p: IdentityPattern = "spiffe://example.org/ns/prod/*".parse().unwrap();
        match &p {
            IdentityPattern::PathPrefix(pp) => {
                assert_eq!(pp.prefix(), "/ns/prod/");
                assert_eq!(pp.trust_domain().as_str(), "example.org");
            }
            other => panic!("expected a prefix, got {other:?}"),
        }
        assert_eq!(
            "spiffe://example.org/a/b"
                .parse::<IdentityPattern>()
                .unwrap(),
            IdentityPattern::Exact(id("spiffe://example.org/a/b"))
        );
        // Scheme and trust domain are case-insensitive in every form.
        assert_eq!(
            "SPIFFE://Example.ORG/a/b"
                .parse::<IdentityPattern>()
                .unwrap(),
            IdentityPattern::Exact(id("spiffe://example.org/a/b"))
        );
        assert_eq!(
            "Spiffe://EXAMPLE.org/a/*"
                .parse::<IdentityPattern>()
                .unwrap()
                .to_string(),
            "spiffe://example.org/a/*"
        );
    }

    #[test]
    fn matching() {
        let prefix: IdentityPattern = "spiffe://example.org/ns/prod/*".parse().unwrap();
        assert!(prefix.matches(&id("spiffe://example.org/ns/prod/sa/web")));
        assert!(prefix.matches(&id("spiffe://example.org/ns/prod/x")));
        assert!(!prefix.matches(&id("spiffe://example.org/ns/prod")));
        assert!(!prefix.matches(&id("spiffe://example.org/ns/production/x")));
        assert!(!prefix.matches(&id("spiffe://other.org/ns/prod/x")));

        let td: IdentityPattern = "spiffe://example.org/*".parse().unwrap();
        assert!(td.matches(&id("spiffe://example.org/anything")));
        assert!(!td.matches(&id("spiffe://example.com/anything")));

        let exact: IdentityPattern = "spiffe://example.org/a".parse().unwrap();
        assert!(exact.matches(&id("spiffe://example.org/a")));
        assert!(!exact.matches(&id("spiffe://example.org/a/b")));

        assert!(IdentityPattern::Any.matches(&id("spiffe://x.y/z")));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("example.org/a", "must be `*` or start with `spiffe://`"),
            (
                "https://example.org/a",
                "must be `*` or start with `spiffe://`",
            ),
            ("spiffe://example.org", "write `spiffe://example.org/*`"),
            ("spiffe://example.org/", "write `spiffe://example.org/*`"),
            ("spiffe://*.example.org/a", "last path segment"),
            ("spiffe://example.org/ns/*/sa", "last path segment"),
            ("spiffe://example.org/ns/prod*", "last path segment"),
            ("spiffe://example.org/*/*", "last path segment"),
            ("spiffe://exa mple.org/a", "trust domain may only contain"),
            ("spiffe://example.org/a//b", "empty segments"),
            ("spiffe://example.org/a/../*", "dot segments"),
            ("spiffe://example.org/a/", "trailing slash"),
        ];
        for (input, want) in cases {
            let err = input.parse::<IdentityPattern>().unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{input:?}: {err:?} should contain {want:?}"
            );
        }
    }

    #[test]
    fn serde_round_trip() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct T {
            p: IdentityPattern,
        }
        let t: T = toml::from_str(r#"p = "spiffe://example.org/ns/*""#).unwrap();
        assert_eq!(
            toml::to_string(&t).unwrap().trim(),
            r#"p = "spiffe://example.org/ns/*""#
        );
        let err = toml::from_str::<T>(r#"p = "spiffe://example.org""#).unwrap_err();
        assert!(
            err.to_string().contains("names only a trust domain"),
            "{err}"
        );
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-z0-9_-][a-z0-9._-]{0,8}".prop_filter("no dot segments", |s| s != "." && s != "..")
    }

    fn trust_domain() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9.-]{0,12}"
    }

    fn path() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(segment(), 1..5)
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            let _ = s.parse::<IdentityPattern>();
        }

        #[test]
        fn never_panics_near_valid(s in "(spiffe://)?[a-zA-Z0-9./*_-]{0,40}") {
            if let Ok(p) = s.parse::<IdentityPattern>() {
                // Whatever parses displays back to an equal pattern.
                prop_assert_eq!(p.to_string().parse::<IdentityPattern>().unwrap(), p);
            }
        }

        #[test]
        fn display_round_trips(td in trust_domain(), segs in path(), wild in any::<bool>()) {
            let text = if wild {
                format!("spiffe://{td}/{}/*", segs.join("/"))
            } else {
                format!("spiffe://{td}/{}", segs.join("/"))
            };
            let p: IdentityPattern = text.parse().unwrap();
            prop_assert_eq!(p.to_string(), text);
        }

        #[test]
        fn prefix_matches_exactly_the_ids_below_it(
            td in trust_domain(),
            prefix in path(),
            rest in prop::collection::vec(segment(), 0..3),
            other in path(),
        ) {
            let p: IdentityPattern = format!("spiffe://{td}/{}/*", prefix.join("/")).parse().unwrap();
            let mut below = prefix.clone();
            below.extend(rest.iter().cloned());
            let candidate = id(&format!("spiffe://{td}/{}", below.join("/")));
            prop_assert_eq!(p.matches(&candidate), !rest.is_empty());
            let unrelated = id(&format!("spiffe://{td}/{}", other.join("/")));
            let expect = other.len() > prefix.len() && other[..prefix.len()] == prefix[..];
            prop_assert_eq!(p.matches(&unrelated), expect);
            let elsewhere = id(&format!("spiffe://{td}x/{}", below.join("/")));
            prop_assert!(!p.matches(&elsewhere));
        }

        #[test]
        fn exact_matches_only_itself(td in trust_domain(), a in path(), b in path()) {
            let ida = id(&format!("spiffe://{td}/{}", a.join("/")));
            let idb = id(&format!("spiffe://{td}/{}", b.join("/")));
            let p = IdentityPattern::from(ida.clone());
            prop_assert!(p.matches(&ida));
            prop_assert_eq!(p.matches(&idb), ida == idb);
        }
    }
}
