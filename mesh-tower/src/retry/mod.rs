//! Retry policy pieces shared by the client stack.
//!
//! - [`budget`]: the retry budget that caps retries across all requests of a client.

pub mod budget;
