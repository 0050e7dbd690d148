#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

#[test]
fn spill_rules() {
    let c = |penalized, cost| Cost {
        unready: false,
        penalized,
        cost,
    };
    assert!(!spill(c(false, 10.0), c(false, 10.0), 1.5));
    assert!(!spill(c(false, 15.0), c(false, 10.0), 1.5));
    assert!(spill(c(false, 15.1), c(false, 10.0), 1.5));
    assert!(spill(c(true, 1.0), c(false, 100.0), 1.5));
    assert!(!spill(c(false, 100.0), c(true, 1.0), 1.5));
}

/// A test endpoint with a fixed cost, answering at once.
#[derive(Clone)]
struct Fixed {
    cost: f64,
    penalized: bool,
}

impl Load for Fixed {
    fn load(&self, _now: Instant) -> Cost {
        Cost {
            unready: false,
            penalized: self.penalized,
            cost: self.cost,
        }
    }
}

impl tower_service::Service<http::Request<()>> for Fixed {
    type Response = http::Response<()>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<http::Response<()>, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(())))
    }
}

/// A balancer over fixed-cost endpoints, recording its picks.
async fn balancer(
    endpoints: &[(&str, f64, bool)],
    record: Option<&crate::decision::DecisionRecord>,
) -> Balance<Fixed> {
    use mesh_core::Endpoint;
    let costs: std::collections::HashMap<std::net::SocketAddr, (f64, bool)> = endpoints
        .iter()
        .map(|(a, c, p)| (a.parse().unwrap(), (*c, *p)))
        .collect();
    let discovery = mesh_core::discover::StaticDiscovery::new(
        costs.keys().map(|a| Endpoint::new(*a)).collect::<Vec<_>>(),
    );
    let mut builder = Balance::builder().service_name("users").seed(7);
    if let Some(record) = record {
        builder = builder.decisions(record.recorder("users"));
    }
    let balance = builder.build(Box::pin(discovery), move |e: &Endpoint| {
        let (cost, penalized) = costs[&e.addr()];
        Some(Fixed { cost, penalized })
    });
    // Let discovery fill the pool.
    while balance.endpoints().len() < endpoints.len() {
        tokio::task::yield_now().await;
    }
    balance
}

#[tokio::test]
async fn a_pick_over_two_endpoints_records_both_costs_and_the_winner() {
    use crate::decision::{DecisionRecord, Kind, PickPath, Tier as T};
    use tower::{Service, ServiceExt};
    let record = DecisionRecord::new(64);
    let mut balance = balancer(
        &[("10.0.0.1:80", 5e6, false), ("10.0.0.2:80", 9e6, true)],
        Some(&record),
    )
    .await;
    for _ in 0..10 {
        balance
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
    }
    let picks = record.of_kind(Kind::Pick);
    assert_eq!(picks.len(), 10);
    for d in &picks {
        let pick = d.event.as_pick().unwrap();
        assert_eq!(pick.path, PickPath::P2c);
        // The unpenalized endpoint is alone in the first tier: it wins with no rival.
        assert_eq!(pick.winner.addr, "10.0.0.1:80".parse().unwrap());
        assert_eq!(pick.winner.cost, 5e6);
        assert_eq!(pick.winner.tier, T::Preferred);
        assert_eq!(pick.other, None);
        assert_eq!(&*d.source, "users");
    }
    assert!(
        picks[0]
            .to_string()
            .ends_with("users pick 10.0.0.1:80 (cost 5.000ms, preferred), alone in its tier"),
        "{}",
        picks[0]
    );

    // Both in one tier: the pair is compared by cost.
    let record = DecisionRecord::new(64);
    let mut balance = balancer(
        &[("10.0.0.1:80", 5e6, false), ("10.0.0.2:80", 9e6, false)],
        Some(&record),
    )
    .await;
    balance
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap();
    let picks = record.snapshot();
    let pick = picks[0].event.as_pick().unwrap();
    assert_eq!(pick.winner.addr, "10.0.0.1:80".parse().unwrap());
    let other = pick.other.unwrap();
    assert_eq!(other.addr, "10.0.0.2:80".parse().unwrap());
    assert_eq!((other.cost, other.tier), (9e6, T::Preferred));
    assert!(
        picks[0].to_string().ends_with(
            "users pick 10.0.0.1:80 (cost 5.000ms, preferred) over 10.0.0.2:80 (cost 9.000ms, preferred)"
        ),
        "{}",
        picks[0]
    );
}
