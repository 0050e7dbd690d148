//! What the clients a mesh built report: read from their metrics registries.
//!
//! Every client, channel or builder the mesh hands out registers its `mesh-tower` metrics
//! in a registry of its own that the mesh keeps. [`ClientStats`] sums them per service:
//! retries sent, retries the budget refused, and breaker transitions per endpoint. The
//! same registries feed the [`Breaker`](crate::events::Event::Breaker) events of the log.
//!
//! Per-endpoint series disappear from a registry when the endpoint leaves the client
//! (removed from discovery, last request done), so counts for removed endpoints stop
//! there; the service-wide counters (retries, budget) never reset.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;

use crate::events::{BreakerEvent, BreakerTransition, Event, Log};

/// What the clients of one service reported, summed over every client the mesh built
/// for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientStats {
    /// Retries sent.
    pub retries: u64,
    /// Retries not sent because the budget was exhausted.
    pub budget_exhausted: u64,
    /// Breaker transitions per endpoint address and kind.
    pub breaker: BTreeMap<(SocketAddr, BreakerTransition), u64>,
    /// Tries that got no response (connect failure, reset, try timeout), per endpoint.
    pub errors: BTreeMap<SocketAddr, u64>,
}

impl ClientStats {
    /// Ejections of the endpoint at `addr`.
    pub fn ejections(&self, addr: SocketAddr) -> u64 {
        self.breaker
            .get(&(addr, BreakerTransition::Ejected))
            .copied()
            .unwrap_or(0)
    }
}

/// One sample line: name, labels, value.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    value: f64,
}

/// Parses the lines of the text exposition format that carry samples (the labels our
/// metrics use have no quotes or commas inside their values).
fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}')?;
                    let labels = rest
                        .split(',')
                        .filter_map(|kv| {
                            let (k, v) = kv.split_once('=')?;
                            Some((k, v.trim_matches('"')))
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, Vec::new()),
            };
            Some(Sample {
                name,
                labels,
                value,
            })
        })
}

impl Sample<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

fn transition(state: &str) -> Option<BreakerTransition> {
    match state {
        "ejected" => Some(BreakerTransition::Ejected),
        "probation" => Some(BreakerTransition::Probation),
        "reinstated" => Some(BreakerTransition::Reinstated),
        _ => None,
    }
}

/// One client's registry and what of it the log has seen.
#[derive(Debug)]
pub(crate) struct ClientRecord {
    registry: Registry,
    seen: BTreeMap<(SocketAddr, BreakerTransition), u64>,
}

/// The registries of one service's clients.
#[derive(Debug, Default)]
pub(crate) struct Clients(Mutex<Vec<ClientRecord>>);

fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(%error, "encoding a mock client's metrics");
    }
    text
}

impl Clients {
    pub(crate) fn add(&self, registry: Registry) {
        if let Ok(mut clients) = self.0.lock() {
            clients.push(ClientRecord {
                registry,
                seen: BTreeMap::new(),
            });
        }
    }

    /// Each client's registry in the text exposition format, in the order added.
    pub(crate) fn texts(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|c| c.iter().map(|c| encode(&c.registry)).collect())
            .unwrap_or_default()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.lock().map(|c| c.is_empty()).unwrap_or(true)
    }

    pub(crate) fn stats(&self) -> ClientStats {
        let mut stats = ClientStats::default();
        let Ok(clients) = self.0.lock() else {
            return stats;
        };
        for client in clients.iter() {
            let text = encode(&client.registry);
            for s in samples(&text) {
                let addr = s.label("server_address").and_then(|a| a.parse().ok());
                match s.name {
                    "mesh_client_retries_total" => stats.retries += s.value as u64,
                    "mesh_client_retry_budget_exhausted_total" => {
                        stats.budget_exhausted += s.value as u64;
                    }
                    "mesh_client_errors_total" => {
                        if let Some(addr) = addr {
                            *stats.errors.entry(addr).or_default() += s.value as u64;
                        }
                    }
                    "mesh_client_breaker_transitions_total" => {
                        if let (Some(addr), Some(t)) = (addr, s.label("state").and_then(transition))
                        {
                            *stats.breaker.entry((addr, t)).or_default() += s.value as u64;
                        }
                    }
                    _ => {}
                }
            }
        }
        stats
    }

    /// Appends a breaker event for every transition counted since the last sample.
    pub(crate) fn sample(
        &self,
        service: &Arc<str>,
        index_of: impl Fn(SocketAddr) -> Option<usize>,
        log: &Log,
    ) {
        let Ok(mut clients) = self.0.lock() else {
            return;
        };
        for client in clients.iter_mut() {
            let text = encode(&client.registry);
            let mut now = BTreeMap::new();
            for s in samples(&text) {
                if s.name != "mesh_client_breaker_transitions_total" {
                    continue;
                }
                if let (Some(addr), Some(t)) = (
                    s.label("server_address").and_then(|a| a.parse().ok()),
                    s.label("state").and_then(transition),
                ) {
                    now.insert((addr, t), s.value as u64);
                }
            }
            // Ejections before probations before reinstatements, per sample.
            let mut fresh: Vec<_> = now
                .iter()
                .filter_map(|(&(addr, t), &n)| {
                    let before = client.seen.get(&(addr, t)).copied().unwrap_or(0);
                    (n > before).then_some((t as u8, addr, t, n - before))
                })
                .collect();
            fresh.sort_by_key(|&(order, addr, _, _)| (order, addr));
            for (_, addr, t, n) in fresh {
                for _ in 0..n {
                    log.push(Event::Breaker(BreakerEvent {
                        service: service.clone(),
                        addr,
                        index: index_of(addr),
                        transition: t,
                    }));
                }
            }
            // Series of removed endpoints are gone: forget them too.
            client.seen = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_parsed_with_their_labels() {
        let text = "# HELP x y\n\
            mesh_client_retries_total{service=\"users\"} 12\n\
            mesh_client_breaker_transitions_total{service=\"users\",server_address=\"127.0.0.1:80\",state=\"ejected\"} 2\n";
        let all: Vec<_> = samples(text).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].name, "mesh_client_retries_total");
        assert_eq!(all[0].value, 12.0);
        assert_eq!(all[1].label("state"), Some("ejected"));
        assert_eq!(all[1].label("server_address"), Some("127.0.0.1:80"));
    }
}
