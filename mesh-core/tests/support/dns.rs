//! A test DNS server: authoritative for `example.test.` on a loopback port (UDP and TCP),
//! its records changed while a test runs. Shared by mesh-core's DNS discovery tests and
//! mesh-proxy's end-to-end tests (included with `#[path]`).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

/// An authoritative server for `example.test.` on a loopback port.
pub(crate) struct TestDns {
    pub(crate) addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    pub(crate) server: Server<Catalog>,
}

pub(crate) fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

impl TestDns {
    pub(crate) async fn start() -> Self {
        let origin = name("example.test.");
        let soa = SOA::new(
            name("ns.example.test."),
            name("admin.example.test."),
            1,
            60,
            60,
            60,
            // The negative TTL of NODATA and NXDOMAIN answers. A NODATA answer for AAAA
            // bounds a host's re-resolution like any TTL, so keep it out of the way.
            30,
        );
        let soa = Record::from_rdata(origin.clone(), 60, RData::SOA(soa));
        let records = BTreeMap::from([(
            RrKey::new(origin.clone().into(), RecordType::SOA),
            RecordSet::from(soa),
        )]);
        let zone: InMemoryZoneHandler =
            InMemoryZoneHandler::new(origin.clone(), records, ZoneType::Primary, AxfrPolicy::Deny)
                .unwrap();
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(origin.into(), vec![zone.clone() as Arc<dyn ZoneHandler>]);

        // UDP and TCP on one port: the UDP port the kernel picks may already be taken for
        // TCP by another test's socket, so try again with another.
        let mut attempts = 0;
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp, addr),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 50 => {
                    attempts += 1;
                }
                Err(e) => panic!("binding TCP on {addr}: {e}"),
            }
        };
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16);
        Self { addr, zone, server }
    }

    /// Replaces the records of `owner` of the type of `rdata` (removes them if empty).
    pub(crate) async fn set(&self, owner: &str, rtype: RecordType, ttl: u32, rdata: Vec<RData>) {
        let owner = name(owner);
        let key = RrKey::new(LowerName::from(owner.clone()), rtype);
        let mut records = self.zone.records_mut().await;
        if rdata.is_empty() {
            records.remove(&key);
            return;
        }
        let mut set = RecordSet::with_ttl(owner.clone(), rtype, ttl);
        for d in rdata {
            assert!(set.insert(Record::from_rdata(owner.clone(), ttl, d), 1));
        }
        records.insert(key, Arc::new(set));
    }

    pub(crate) async fn set_a(&self, owner: &str, ttl: u32, ips: &[&str]) {
        let rdata = ips
            .iter()
            .map(|ip| match ip.parse::<IpAddr>().unwrap() {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(_) => panic!("use set_aaaa"),
            })
            .collect();
        self.set(owner, RecordType::A, ttl, rdata).await;
    }

    pub(crate) async fn set_aaaa(&self, owner: &str, ttl: u32, ips: &[&str]) {
        let rdata = ips
            .iter()
            .map(|ip| RData::AAAA(AAAA(ip.parse().unwrap())))
            .collect();
        self.set(owner, RecordType::AAAA, ttl, rdata).await;
    }
}
