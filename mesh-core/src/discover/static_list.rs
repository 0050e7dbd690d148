//! A fixed list of endpoints.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use super::{Change, DiscoverError, EndpointSet};
use crate::endpoint::Endpoint;

/// Discovery from a fixed list: an `Insert` per endpoint, then the stream ends.
///
/// Endpoints at the same address are merged, the last one winning. Tower's balancers keep
/// serving the endpoints they have when a discovery stream ends.
///
/// ```
/// use futures_util::StreamExt;
/// use mesh_core::discover::{Change, StaticDiscovery};
/// use mesh_core::endpoint::Endpoint;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut d = StaticDiscovery::new([Endpoint::new("127.0.0.1:8080".parse().unwrap())]);
/// assert!(matches!(d.next().await, Some(Ok(Change::Insert(..)))));
/// assert!(d.next().await.is_none());
/// # }
/// ```
#[derive(Debug)]
pub struct StaticDiscovery {
    pending: VecDeque<Change>,
}

impl StaticDiscovery {
    /// Discovery of exactly `endpoints`.
    pub fn new(endpoints: impl IntoIterator<Item = Endpoint>) -> Self {
        let set: EndpointSet = endpoints.into_iter().collect();
        Self {
            pending: EndpointSet::new().diff(&set).into(),
        }
    }

    /// The same, with the stream's error type fixed to `Infallible`.
    pub fn infallible(self) -> impl Stream<Item = Result<Change, Infallible>> + Unpin {
        StaticInfallible(self)
    }
}

impl Stream for StaticDiscovery {
    type Item = Result<Change, DiscoverError>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.pending.pop_front().map(Ok))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.pending.len(), Some(self.pending.len()))
    }
}

#[derive(Debug)]
struct StaticInfallible(StaticDiscovery);

impl Stream for StaticInfallible {
    type Item = Result<Change, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.pending.pop_front().map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn yields_each_endpoint_once_then_ends() {
        let a = Endpoint::new("127.0.0.1:1".parse().unwrap());
        let b = Endpoint::new("[::1]:2".parse().unwrap());
        let a2 = a.clone().with_zone("z");
        let d = StaticDiscovery::new([a, b.clone(), a2.clone()]);
        assert_eq!(d.size_hint(), (2, Some(2)));
        let got: Vec<_> = d.map(|c| c.unwrap()).collect().await;
        let inserted: Vec<&Endpoint> = got
            .iter()
            .map(|c| match c {
                Change::Insert(_, ep) => ep,
                Change::Remove(k) => panic!("unexpected remove {k}"),
            })
            .collect();
        assert_eq!(inserted, [&a2, &b]);
    }

    #[tokio::test]
    async fn plugs_into_tower_discover() {
        use tower::discover::Discover;
        let d = StaticDiscovery::new([Endpoint::new("127.0.0.1:1".parse().unwrap())]).infallible();
        let mut d = std::pin::pin!(d);
        let change = std::future::poll_fn(|cx| d.as_mut().poll_discover(cx)).await;
        assert!(matches!(change, Some(Ok(Change::Insert(..)))));
    }
}
