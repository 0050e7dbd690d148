//! Load balancing: power of two choices over peak-EWMA load.
//!
//! [`load`] measures each endpoint; the balancer that picks among them is tracked on the
//! project's mesh-tower issue.

pub mod load;
