//! Load balancing: power of two choices over peak-EWMA load.
//!
//! [`load`] measures each endpoint and [`p2c`] picks between two of them; the balancer
//! service that ties them to discovery and connections is tracked on the project's
//! mesh-tower issue.

pub mod load;
pub mod p2c;
