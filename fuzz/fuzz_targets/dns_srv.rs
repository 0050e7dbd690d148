//! DNS SRV answers as discovery sees them (records and each target's A/AAAA addresses,
//! as a hostile or broken DNS server may send): never a panic, one endpoint per distinct
//! address and port, each weighted by the sum of its records' shares (a record's weight
//! times 1,000 split across its target's addresses, at least 1), saturating.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use mesh_core::discover::dns::srv_answer_endpoints;

type Records = Vec<(String, u16, u16)>;
type Addrs = Vec<(String, Vec<IpAddr>)>;

fuzz_target!(|input: (Records, Addrs)| {
    let (records, addrs) = input;
    let set = srv_answer_endpoints(&records, &addrs);
    // Every endpoint comes from some record's port and some address.
    let ports: BTreeSet<u16> = records.iter().map(|r| r.1).collect();
    let ips: BTreeSet<IpAddr> = addrs.iter().flat_map(|a| a.1.iter().copied()).collect();
    let mut seen = BTreeMap::<SocketAddr, u32>::new();
    for ep in set.iter() {
        assert!(ports.contains(&ep.addr().port()), "{ep:?}");
        assert!(ips.contains(&ep.addr().ip()), "{ep:?}");
        assert!(seen.insert(ep.addr(), ep.weight().get()).is_none());
        let max = records.len() as u64 * u64::from(u16::MAX) * 1000;
        assert!(u64::from(ep.weight().get()) <= max.max(1));
    }
});
