//! Error types shared by the mesh crates, and helpers to inspect error chains.
//!
//! Middleware in the mesh returns [`BoxError`] so that layers compose; each concrete cause
//! is a small type with `Display` and `source()`. Errors that users branch on are one
//! `#[non_exhaustive]` enum per concern, defined beside the code that produces them and
//! re-exported here:
//!
//! - [`PatternError`]: an identity pattern that does not parse;
//! - [`DiscoverError`]: a discovery source that failed (the source keeps its last good set);
//! - [`HeaderError`]: a `Retry-After`, `grpc-retry-pushback-ms`, `grpc-timeout` or
//!   `grpc-status` header that does not parse;
//! - [`ConfigError`]: configuration that does not parse or does not validate.
//!
//! [`find_cause`] and [`is_caused_by`] walk a `source()` chain to find a cause of a given
//! type, looking through boxes, the way a retry policy asks "was this a connect error?".

use std::error::Error;

pub use crate::classify::HeaderError;
pub use crate::config::{ConfigError, ValidationError};
pub use crate::discover::DiscoverError;
pub use crate::identity::PatternError;

/// A type-erased error, as tower middleware returns.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// Returns the first error in `err`'s chain (starting with `err` itself) that is an `E`.
///
/// ```
/// use mesh_core::error::{find_cause, BoxError};
/// use std::io;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("connect failed")]
/// struct Connect(#[source] io::Error);
///
/// let err: BoxError = Box::new(Connect(io::Error::from(io::ErrorKind::ConnectionRefused)));
/// let io = find_cause::<io::Error>(&*err).unwrap();
/// assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
/// ```
pub fn find_cause<'a, E: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// Returns whether any error in `err`'s chain (including `err`) is an `E`.
pub fn is_caused_by<E: Error + 'static>(err: &(dyn Error + 'static)) -> bool {
    find_cause::<E>(err).is_some()
}

/// Iterates over `err` and its chain of sources.
pub fn chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e| (*e).source())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fmt, io};

    #[derive(Debug)]
    struct Outer(BoxError);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn finds_causes_through_boxes() {
        let inner = io::Error::new(io::ErrorKind::TimedOut, "slow");
        let err: BoxError = Box::new(Outer(Box::new(Outer(Box::new(inner)))));
        assert_eq!(
            find_cause::<io::Error>(&*err).unwrap().kind(),
            io::ErrorKind::TimedOut
        );
        assert!(is_caused_by::<Outer>(&*err));
        assert!(!is_caused_by::<std::fmt::Error>(&*err));
        assert_eq!(chain(&*err).count(), 3);
        let msgs: Vec<String> = chain(&*err).map(|e| e.to_string()).collect();
        assert_eq!(msgs, ["outer", "outer", "slow"]);
    }
}
