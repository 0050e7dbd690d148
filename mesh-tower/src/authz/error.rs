//! Errors of the authorization layer.

use crate::matcher::MatchError;

/// A rule's route match could not be compiled.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "authorization policy `{policy}`, rule `{rule}` (rules[{index}].routes[{route}]): {source}"
)]
pub struct PolicyError {
    pub(super) policy: String,
    pub(super) rule: String,
    pub(super) index: usize,
    pub(super) route: usize,
    #[source]
    pub(super) source: MatchError,
}
