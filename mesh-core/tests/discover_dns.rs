//! `DnsDiscovery` against an in-process authoritative server (hickory-server with an
//! in-memory zone whose records each test changes while it runs).
//!
//! Real time throughout: the resolver's timeouts run on tokio time, so paused time would
//! fire them while a real UDP answer is on its way. Floors, TTLs and timeouts are kept
//! small instead.
#![cfg(feature = "discover-dns")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use hickory_server::proto::rr::RData;
use hickory_server::proto::rr::RecordType;
use hickory_server::proto::rr::rdata::{SRV, TXT};
use mesh_core::discover::{Change, DiscoverError, DnsDiscovery, DnsDiscoveryBuilder};
use mesh_core::identity::SpiffeId;
use tokio::time::{Instant, timeout};

/// Long enough for a few resolution rounds on a loaded machine.
const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing happens" is observed: several rounds at the test floor and TTL.
const QUIET: Duration = Duration::from_millis(1200);
const FLOOR: Duration = Duration::from_millis(200);

#[path = "support/dns.rs"]
mod support;
use support::{TestDns, name};

impl TestDns {
    /// A discovery of `host:8080` against this server, with small test timings.
    fn host(&self, host: &str) -> DnsDiscoveryBuilder {
        self.tune(DnsDiscovery::host(host, 8080))
    }

    fn tune(&self, b: DnsDiscoveryBuilder) -> DnsDiscoveryBuilder {
        b.name_server(self.addr)
            .ttl_floor(FLOOR)
            .ttl_ceiling(Duration::from_secs(60))
            .query_timeout(Duration::from_millis(300))
    }
}

/// A change as a comparable string: `+addr weight` or `-addr`.
fn show(change: Change) -> String {
    match change {
        Change::Insert(k, ep) => format!("+{k} w{}", ep.weight()),
        Change::Remove(k) => format!("-{k}"),
    }
}

/// The next `n` changes (waiting up to `WAIT` for each), then checks that no more follow.
async fn changes(d: &mut DnsDiscovery, n: usize) -> Vec<String> {
    let out = next_changes(d, n).await;
    assert_quiet(d).await;
    out
}

async fn next_changes(d: &mut DnsDiscovery, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let c = timeout(WAIT, d.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {out:?}"))
            .expect("stream ended")
            .expect("stream yielded an error");
        out.push(show(c));
    }
    out
}

async fn assert_quiet(d: &mut DnsDiscovery) {
    if let Ok(c) = timeout(QUIET, d.next()).await {
        panic!("unexpected change: {:?}", c.map(|c| c.map(show)));
    }
}

#[tokio::test]
async fn a_and_aaaa_then_only_the_diff_after_the_ttl() {
    let dns = TestDns::start().await;
    dns.set_a("users.example.test.", 1, &["10.0.0.2", "10.0.0.1"])
        .await;
    dns.set_aaaa("users.example.test.", 1, &["fd00::1"]).await;
    let mut d = dns.host("users.example.test").build().unwrap();
    assert_eq!(
        changes(&mut d, 3).await,
        [
            "+10.0.0.1:8080 w1",
            "+10.0.0.2:8080 w1",
            "+[fd00::1]:8080 w1"
        ]
    );

    dns.set_a("users.example.test.", 1, &["10.0.0.2", "10.0.0.3"])
        .await;
    assert_eq!(
        changes(&mut d, 2).await,
        ["+10.0.0.3:8080 w1", "-10.0.0.1:8080"]
    );

    // One family gone: NODATA for AAAA, the A records stay.
    dns.set_aaaa("users.example.test.", 1, &[]).await;
    assert_eq!(changes(&mut d, 1).await, ["-[fd00::1]:8080"]);
}

#[tokio::test]
async fn srv_ports_weights_identity_and_zone() {
    let dns = TestDns::start().await;
    let srv = |weight, port, target| RData::SRV(SRV::new(0, weight, port, name(target)));
    dns.set(
        "_http._tcp.users.example.test.",
        RecordType::SRV,
        1,
        vec![
            srv(10, 8080, "a.example.test."),
            srv(0, 9090, "b.example.test."),
        ],
    )
    .await;
    dns.set_a("a.example.test.", 1, &["10.0.1.1"]).await;
    dns.set_aaaa("a.example.test.", 1, &["fd00::a"]).await;
    dns.set_a("b.example.test.", 1, &["10.0.1.2"]).await;

    let id = SpiffeId::new("spiffe://example.test/users").unwrap();
    let mut d = dns
        .tune(DnsDiscovery::srv("_http._tcp.users.example.test."))
        .identity(id.clone())
        .zone("z1")
        .build()
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        match timeout(WAIT, d.next()).await.unwrap().unwrap().unwrap() {
            Change::Insert(_, ep) => {
                assert_eq!(ep.identity(), Some(&id));
                assert_eq!(ep.zone(), Some("z1"));
                got.push(format!("{} w{}", ep.addr(), ep.weight()));
            }
            Change::Remove(k) => panic!("unexpected remove {k}"),
        }
    }
    assert_eq!(
        got,
        [
            // a's weight, scaled by 1000, split across its two addresses; b's weight 0
            // next to a weight above 0: the smallest share.
            "10.0.1.1:8080 w5000",
            "10.0.1.2:9090 w1",
            "[fd00::a]:8080 w5000"
        ]
    );
    assert_quiet(&mut d).await;

    // Re-weight a, drop b, move a target's address.
    dns.set(
        "_http._tcp.users.example.test.",
        RecordType::SRV,
        1,
        vec![srv(20, 8080, "a.example.test.")],
    )
    .await;
    dns.set_a("a.example.test.", 1, &["10.0.1.3"]).await;
    assert_eq!(
        changes(&mut d, 4).await,
        [
            "+10.0.1.3:8080 w10000",
            "+[fd00::a]:8080 w10000",
            "-10.0.1.1:8080",
            "-10.0.1.2:9090"
        ]
    );
}

/// A short NXDOMAIN keeps the last set; one that lasts the grace period empties it (a
/// Kubernetes headless service with no ready endpoint answers NXDOMAIN).
#[tokio::test]
async fn nxdomain_keeps_the_last_set_for_the_grace_then_empties_it() {
    const GRACE: Duration = Duration::from_millis(1500);
    let dns = TestDns::start().await;
    dns.set_a("gone.example.test.", 1, &["10.0.0.1", "10.0.0.2"])
        .await;
    let mut d = dns
        .host("gone.example.test")
        .nxdomain_grace(GRACE)
        .build()
        .unwrap();
    changes(&mut d, 2).await;

    // No records at all under the name: NXDOMAIN, several rounds at the floor, for less
    // than the grace; then the name is back.
    dns.set_a("gone.example.test.", 1, &[]).await;
    tokio::time::sleep(GRACE / 2).await;
    dns.set_a("gone.example.test.", 1, &["10.0.0.2", "10.0.0.9"])
        .await;
    assert_eq!(
        changes(&mut d, 2).await,
        ["+10.0.0.9:8080 w1", "-10.0.0.1:8080"]
    );

    // NXDOMAIN for the grace: the set empties, not before.
    dns.set_a("gone.example.test.", 1, &[]).await;
    let gone = Instant::now();
    assert_eq!(
        next_changes(&mut d, 2).await,
        ["-10.0.0.2:8080", "-10.0.0.9:8080"]
    );
    let elapsed = gone.elapsed();
    assert!(elapsed >= GRACE, "{elapsed:?}");
    assert_quiet(&mut d).await;

    // And recovery applies the difference.
    dns.set_a("gone.example.test.", 1, &["10.0.0.9"]).await;
    assert_eq!(changes(&mut d, 1).await, ["+10.0.0.9:8080 w1"]);
}

#[tokio::test]
async fn a_successful_empty_answer_empties_the_set() {
    let dns = TestDns::start().await;
    dns.set_a("empty.example.test.", 1, &["10.0.0.1"]).await;
    let mut d = dns.host("empty.example.test").build().unwrap();
    changes(&mut d, 1).await;

    // The name still exists (it has a TXT record) but has no addresses: NODATA.
    dns.set(
        "empty.example.test.",
        RecordType::TXT,
        1,
        vec![RData::TXT(TXT::new(vec!["drained".to_owned()]))],
    )
    .await;
    dns.set_a("empty.example.test.", 1, &[]).await;
    assert_eq!(changes(&mut d, 1).await, ["-10.0.0.1:8080"]);

    // While the set is empty the name is asked again soon (backing off from the floor),
    // not after the 30 s negative TTL of the zone's SOA.
    dns.set_a("empty.example.test.", 1, &["10.0.0.2"]).await;
    let back = Instant::now();
    assert_eq!(next_changes(&mut d, 1).await, ["+10.0.0.2:8080 w1"]);
    let elapsed = back.elapsed();
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[tokio::test]
async fn an_unreachable_server_keeps_the_last_set() {
    let mut dns = TestDns::start().await;
    dns.set_a("users.example.test.", 1, &["10.0.0.1"]).await;
    let mut d = dns.host("users.example.test").build().unwrap();
    changes(&mut d, 1).await;

    // Queries now time out (300 ms, two attempts) or are refused, round after round.
    dns.server.shutdown_gracefully().await.unwrap();
    let quiet = timeout(Duration::from_secs(2), d.next()).await;
    assert!(
        quiet.is_err(),
        "unexpected {:?}",
        quiet.map(|c| c.map(|c| c.map(show)))
    );
}

#[tokio::test]
async fn the_ttl_decides_when_to_resolve_again() {
    let dns = TestDns::start().await;
    dns.set_a("ttl.example.test.", 2, &["10.0.0.1"]).await;
    let mut d = dns.host("ttl.example.test").build().unwrap();
    next_changes(&mut d, 1).await;
    let resolved = Instant::now();

    dns.set_a("ttl.example.test.", 2, &["10.0.0.2"]).await;
    next_changes(&mut d, 2).await;
    let elapsed = resolved.elapsed();
    // Not at the 200 ms floor: at the 2 s TTL.
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(4)).contains(&elapsed),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn a_zero_ttl_is_raised_to_the_floor() {
    let dns = TestDns::start().await;
    dns.set_a("zero.example.test.", 0, &["10.0.0.1"]).await;
    let mut d = dns
        .host("zero.example.test")
        .ttl_floor(Duration::from_secs(1))
        .build()
        .unwrap();
    next_changes(&mut d, 1).await;
    let resolved = Instant::now();

    dns.set_a("zero.example.test.", 0, &["10.0.0.2"]).await;
    next_changes(&mut d, 2).await;
    let elapsed = resolved.elapsed();
    assert!(
        (Duration::from_millis(800)..Duration::from_secs(3)).contains(&elapsed),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn a_long_ttl_is_lowered_to_the_ceiling() {
    let dns = TestDns::start().await;
    dns.set_a("long.example.test.", 86_400, &["10.0.0.1"]).await;
    let mut d = dns
        .host("long.example.test")
        .ttl_ceiling(Duration::from_secs(1))
        .build()
        .unwrap();
    next_changes(&mut d, 1).await;
    let resolved = Instant::now();

    // Only a re-resolution that bypasses the day-long TTL (and hickory's cache) sees this.
    dns.set_a("long.example.test.", 86_400, &["10.0.0.2"]).await;
    next_changes(&mut d, 2).await;
    let elapsed = resolved.elapsed();
    assert!(
        (Duration::from_millis(800)..Duration::from_secs(3)).contains(&elapsed),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn invalid_settings_fail_at_construction() {
    let ns: SocketAddr = "127.0.0.1:53".parse().unwrap();
    for b in [
        DnsDiscovery::host("not a name", 80),
        DnsDiscovery::host("10.0.0.1", 80),
        DnsDiscovery::srv("users.example.test"),
        DnsDiscovery::host("users.example.test", 80)
            .ttl_floor(Duration::from_secs(10))
            .ttl_ceiling(Duration::from_secs(1)),
        // After a failure the servers would be asked again at once, without end.
        DnsDiscovery::host("users.example.test", 80).ttl_floor(Duration::ZERO),
    ] {
        let err = b.name_server(ns).build().unwrap_err();
        assert!(matches!(err, DiscoverError::Dns { .. }), "{err:?}");
    }
    // A link-local name server: its interface cannot be given to the DNS client.
    let err = DnsDiscovery::host("users.example.test", 80)
        .name_server("[fe80::1%2]:53".parse().unwrap())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("link-local"), "{err}");
}

/// What a [`raw_server`] answers: the response code, then the answer and authority
/// records, each already in wire form (see [`rr`]).
struct Reply {
    rcode: u8,
    answers: Vec<Vec<u8>>,
    authority: Vec<Vec<u8>>,
}

/// A resource record in wire form: `owner` as wire bytes (`&[0xc0, 12]` points to the
/// question's name), class IN, TTL 1 s.
fn rr(owner: &[u8], rtype: u16, rdata: &[u8]) -> Vec<u8> {
    let mut out = owner.to_vec();
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 1]);
    out.extend_from_slice(&u16::try_from(rdata.len()).unwrap().to_be_bytes());
    out.extend_from_slice(rdata);
    out
}

/// A name in wire form.
fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).unwrap());
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A name server that answers each query (any name) with what `reply` says for its type,
/// and not at all when it says `None`: UDP only.
async fn raw_server(reply: impl Fn(u16) -> Option<Reply> + Send + Sync + 'static) -> SocketAddr {
    raw_server_after(Duration::ZERO, reply).await
}

/// [`raw_server`], answering each query after `delay`.
async fn raw_server_after(
    delay: Duration,
    reply: impl Fn(u16) -> Option<Reply> + Send + Sync + 'static,
) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let query = &buf[..n];
            // The question: 12 header bytes, then labels up to a zero byte, then the type.
            let Some(end) = query.get(12..).and_then(|q| q.iter().position(|&b| b == 0)) else {
                continue;
            };
            let qtype_at = 12 + end + 1;
            let Some(&[hi, lo]) = query.get(qtype_at..qtype_at + 2) else {
                continue;
            };
            let Some(r) = reply(u16::from_be_bytes([hi, lo])) else {
                continue; // no answer at all
            };
            let question = &query[12..qtype_at + 4];
            let mut answer = Vec::with_capacity(128);
            answer.extend_from_slice(&query[..2]); // the id
            // A response, authoritative, recursion desired and available, the code.
            answer.extend_from_slice(&[0x85, 0x80 | r.rcode]);
            answer.extend_from_slice(&[0, 1]); // 1 question
            for count in [r.answers.len(), r.authority.len(), 0] {
                answer.extend_from_slice(&u16::try_from(count).unwrap().to_be_bytes());
            }
            answer.extend_from_slice(question);
            for record in r.answers.iter().chain(&r.authority) {
                answer.extend_from_slice(record);
            }
            tokio::time::sleep(delay).await;
            let _ = socket.send_to(&answer, from).await;
        }
    });
    addr
}

const QTYPE_A: u16 = 1;

/// A name server that answers every A query for any name with `ip` (TTL 1 s) and never
/// answers anything else, as some firewalls and DNS proxies treat AAAA: UDP only.
async fn a_only_server(ip: [u8; 4]) -> SocketAddr {
    raw_server(move |qtype| {
        (qtype == QTYPE_A).then(|| Reply {
            rcode: 0,
            answers: vec![rr(&[0xc0, 12], QTYPE_A, &ip)],
            authority: vec![],
        })
    })
    .await
}

fn raw_discovery(server: SocketAddr) -> DnsDiscovery {
    DnsDiscovery::host("users.example.test", 8080)
        .name_server(server)
        .ttl_floor(FLOOR)
        .query_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

/// An answer may hold records of other names; only those of the name asked (or of its
/// CNAME chain) are endpoints.
#[tokio::test]
async fn records_of_other_names_in_the_answer_are_ignored() {
    let server = raw_server(|qtype| {
        (qtype == QTYPE_A).then(|| Reply {
            rcode: 0,
            answers: vec![
                rr(&[0xc0, 12], QTYPE_A, &[10, 0, 0, 7]),
                rr(&wire_name("evil.test."), QTYPE_A, &[6, 6, 6, 6]),
            ],
            authority: vec![],
        })
    })
    .await;
    let mut d = raw_discovery(server);
    assert_eq!(changes(&mut d, 1).await, ["+10.0.0.7:8080 w1"]);
}

/// A NOERROR answer with no records, NS records and no SOA is a referral (or a lame
/// server), not "no addresses": the last set stays.
#[tokio::test]
async fn a_referral_keeps_the_last_set() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let referral = Arc::new(AtomicBool::new(false));
    let flag = referral.clone();
    let server = raw_server(move |qtype| {
        let root_ns = rr(&[0], 2, &wire_name("a.root-servers.test."));
        Some(if qtype == QTYPE_A && !flag.load(Ordering::SeqCst) {
            Reply {
                rcode: 0,
                answers: vec![rr(&[0xc0, 12], QTYPE_A, &[10, 0, 0, 7])],
                authority: vec![],
            }
        } else {
            // An upward referral, for AAAA from the start.
            Reply {
                rcode: 0,
                answers: vec![],
                authority: vec![root_ns],
            }
        })
    })
    .await;
    let mut d = raw_discovery(server);
    assert_eq!(next_changes(&mut d, 1).await, ["+10.0.0.7:8080 w1"]);
    referral.store(true, Ordering::SeqCst);
    assert_quiet(&mut d).await;
}

/// One family failing (AAAA unanswered) while the other answers still gives that family's
/// endpoints; before, the whole lookup failed and the name never got any.
#[tokio::test]
async fn a_server_that_drops_aaaa_still_gives_the_ipv4_endpoints() {
    let server = a_only_server([10, 0, 0, 7]).await;
    let mut d = raw_discovery(server);
    assert_eq!(changes(&mut d, 1).await, ["+10.0.0.7:8080 w1"]);
}

#[test]
fn building_outside_a_runtime_is_an_error() {
    let err = DnsDiscovery::host("users.example.test", 80)
        .name_server("127.0.0.1:53".parse().unwrap())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_stream_stops_the_task() {
    let dns = TestDns::start().await;
    dns.set_a("users.example.test.", 1, &["10.0.0.1"]).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();

    let mut d = dns.host("users.example.test").build().unwrap();
    next_changes(&mut d, 1).await;
    drop(d);
    timeout(WAIT, async {
        while metrics.num_alive_tasks() > before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the resolve task outlived its stream");
}

/// RFC 2782: a backup priority is resolved only when the one before has no address, so
/// a broken backup target neither warns nor pins re-resolution to the floor.
#[tokio::test]
async fn a_broken_backup_target_does_not_pin_the_floor() {
    let dns = TestDns::start().await;
    dns.set(
        "_http._tcp.users.example.test.",
        RecordType::SRV,
        2,
        vec![
            RData::SRV(SRV::new(10, 1, 8080, name("primary.example.test."))),
            // No records at all: NXDOMAIN.
            RData::SRV(SRV::new(20, 1, 8080, name("backup.example.test."))),
        ],
    )
    .await;
    dns.set_a("primary.example.test.", 2, &["10.0.1.1"]).await;
    let mut d = dns
        .tune(DnsDiscovery::srv("_http._tcp.users.example.test."))
        .build()
        .unwrap();
    next_changes(&mut d, 1).await;
    let resolved = Instant::now();

    dns.set_a("primary.example.test.", 2, &["10.0.1.2"]).await;
    assert_eq!(
        next_changes(&mut d, 2).await,
        ["+10.0.1.2:8080 w1000", "-10.0.1.1:8080"]
    );
    let elapsed = resolved.elapsed();
    // At the 2 s TTL, not at the 200 ms floor.
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(4)).contains(&elapsed),
        "{elapsed:?}"
    );
}

/// An unspecified, multicast or broadcast address is never an endpoint: a DNS filter that
/// null-routes a name to 0.0.0.0 would send the traffic to local ports.
#[tokio::test]
async fn unusable_addresses_are_skipped() {
    let dns = TestDns::start().await;
    dns.set_a(
        "users.example.test.",
        1,
        &["0.0.0.0", "10.0.0.1", "224.0.0.1", "255.255.255.255"],
    )
    .await;
    dns.set_aaaa("users.example.test.", 1, &["::", "ff02::1"])
        .await;
    let mut d = dns.host("users.example.test").build().unwrap();
    assert_eq!(changes(&mut d, 1).await, ["+10.0.0.1:8080 w1"]);
}

/// `::ffff:a.b.c.d` in AAAA beside `a.b.c.d` in A is one host, one endpoint.
#[tokio::test]
async fn ipv4_mapped_addresses_are_ipv4() {
    let dns = TestDns::start().await;
    dns.set_a("users.example.test.", 1, &["10.0.0.1"]).await;
    dns.set_aaaa(
        "users.example.test.",
        1,
        &["::ffff:10.0.0.1", "::ffff:10.0.0.2"],
    )
    .await;
    let mut d = dns.host("users.example.test").build().unwrap();
    assert_eq!(
        changes(&mut d, 2).await,
        ["+10.0.0.1:8080 w1", "+10.0.0.2:8080 w1"]
    );
}

/// hickory's pool gives up on the first SERVFAIL or REFUSED, even from one broken server
/// among healthy ones: each server is then asked in turn.
#[tokio::test]
async fn a_refusing_name_server_does_not_hide_a_healthy_one() {
    let refusing = raw_server(|_| {
        Some(Reply {
            rcode: 5,
            answers: vec![],
            authority: vec![],
        })
    })
    .await;
    // Slower, so that the refusal comes first.
    let healthy = raw_server_after(Duration::from_millis(100), |qtype| {
        (qtype == QTYPE_A).then(|| Reply {
            rcode: 0,
            answers: vec![rr(&[0xc0, 12], QTYPE_A, &[10, 0, 0, 7])],
            authority: vec![],
        })
    })
    .await;
    let mut d = DnsDiscovery::host("users.example.test", 8080)
        .name_server(refusing)
        .name_server(healthy)
        .ttl_floor(FLOOR)
        .query_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert_eq!(changes(&mut d, 1).await, ["+10.0.0.7:8080 w1"]);
}
