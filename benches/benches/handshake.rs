//! Full mutual-TLS handshakes per second: our SPIFFE verifier against rustls' own WebPKI
//! verifiers, with the same keys, in the same run.
//!
//! Both configurations use the same root, the same ECDSA P-256 SVIDs (which carry a DNS
//! SAN too, so that WebPKI's name check can pass), TLS 1.3, the `ring` provider and no
//! session resumption, and run the handshake in memory (no sockets), so the difference is
//! the verification and certificate-resolution path alone.
//!
//! ```text
//! cargo bench -p mesh-benches --bench handshake
//! ```
//!
//! Report `webpki / spiffe` time per handshake as the ratio of handshake rates.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::SpiffeId;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, Svid};
use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;

/// Runs one full handshake between fresh connections, in memory.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, name: &ServerName<'static>) {
    let mut c = ClientConnection::new(client.clone(), name.clone()).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        s.process_new_packets().unwrap();
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets().unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let mut ca = TestCa::new("example.org").unwrap();
    let server_svid = ca
        .leaf()
        .uri("spiffe://example.org/api")
        .dns("api.example.org")
        .build()
        .unwrap();
    let client_svid = ca
        .leaf()
        .uri("spiffe://example.org/web")
        .dns("web.example.org")
        .build()
        .unwrap();
    let provider = mesh_spiffe::tls::default_provider();

    // Ours, with the very same certificates and keys.
    let copy = |svid: &Svid| Svid::new(svid.chain().to_vec(), svid.key().clone_key()).unwrap();
    let server = Mtls::new(CredentialStore::with(
        copy(&server_svid),
        ca.bundle_set().unwrap(),
    ));
    let client = Mtls::new(CredentialStore::with(
        copy(&client_svid),
        ca.bundle_set().unwrap(),
    ));
    let spiffe_server = Arc::new(
        server
            .server_config(Authorizer::trust_domain(ca.trust_domain().clone()))
            .unwrap(),
    );
    let spiffe_client = Arc::new(
        client
            .client_config(Authorizer::exact(
                SpiffeId::new("spiffe://example.org/api").unwrap(),
            ))
            .unwrap(),
    );

    // The baseline: rustls' WebPKI verifiers, same root, same kind of keys.
    let mut roots = RootCertStore::empty();
    roots.add(ca.root().clone()).unwrap();
    let roots = Arc::new(roots);
    let mut webpki_server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .unwrap(),
        )
        .with_single_cert(server_svid.chain().to_vec(), server_svid.key().clone_key())
        .unwrap();
    webpki_server.session_storage = Arc::new(NoServerSessionStorage {});
    webpki_server.send_tls13_tickets = 0;
    let mut webpki_client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client_svid.chain().to_vec(), client_svid.key().clone_key())
        .unwrap();
    webpki_client.resumption = Resumption::disabled();
    let (webpki_server, webpki_client) = (Arc::new(webpki_server), Arc::new(webpki_client));

    let dns_name = ServerName::try_from("api.example.org").unwrap();
    let ip_name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());

    let mut group = c.benchmark_group("mtls_handshake");
    group.bench_function("webpki_baseline", |b| {
        b.iter(|| handshake(&webpki_client, &webpki_server, &dns_name))
    });
    group.bench_function("spiffe", |b| {
        b.iter(|| handshake(&spiffe_client, &spiffe_server, &ip_name))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
