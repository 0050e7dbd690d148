//! The fake Workload API server against real clients: the `spiffe` crate's `X509Source`
//! and `WorkloadApiClient`, a raw gRPC client, and our `SpireSource` feeding mutual TLS.
//!
//! Every wait is bounded by [`WAIT`], so a broken server fails a test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_spiffe::credentials::{CredentialSource, CredentialStore};
use mesh_spiffe::fake_workload_api::{FakeWorkloadApi, SECURITY_HEADER, X509Update};
use mesh_spiffe::spire::{SpireError, SpireSource};
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, Mtls, MtlsAcceptor, MtlsConnector, Svid};
use rustls_pki_types::CertificateDer;
use spiffe::{BundleSource as _, WorkloadApiClient, X509Source};
use tempfile::TempDir;
use tonic::codegen::http::uri::PathAndQuery;

/// The bound on any single wait.
const WAIT: Duration = Duration::from_secs(5);

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

/// A CA for `example.org` and a fake agent serving `spiffe://example.org/web`.
struct Agent {
    _dir: TempDir,
    ca: TestCa,
    api: FakeWorkloadApi,
}

/// Where the fake agent listens.
#[derive(Clone, Copy)]
enum Transport {
    #[cfg(unix)]
    Unix,
    Tcp,
}

impl Agent {
    /// On a Unix socket where there are Unix sockets, else on loopback TCP.
    fn start() -> Self {
        #[cfg(unix)]
        return Self::start_on(Transport::Unix);
        #[cfg(not(unix))]
        return Self::start_on(Transport::Tcp);
    }

    fn start_on(transport: Transport) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = TestCa::new("example.org").unwrap();
        let first = update(&mut ca, "spiffe://example.org/web");
        let api = match transport {
            #[cfg(unix)]
            Transport::Unix => {
                FakeWorkloadApi::start(dir.path().join("agent.sock"), first).unwrap()
            }
            Transport::Tcp => {
                let api =
                    FakeWorkloadApi::start_tcp("127.0.0.1:0".parse().unwrap(), first).unwrap();
                let addr = api.local_addr().expect("a TCP server has an address");
                assert_eq!(api.endpoint(), format!("tcp://{addr}"));
                assert_eq!(api.socket_path(), None);
                api
            }
        };
        Self { _dir: dir, ca, api }
    }

    fn push(&mut self, id: &str) -> Svid {
        let svid = self.ca.issue(id).unwrap();
        self.api
            .push(X509Update::new(&svid, &self.ca.bundle_set().unwrap()));
        svid
    }

    /// A `SpireSource` of this agent, synced.
    async fn spire(&self) -> SpireSource {
        SpireSource::builder()
            .endpoint(self.api.endpoint())
            .initial_timeout(WAIT)
            .build()
            .await
            .unwrap()
    }

    async fn x509_source(&self) -> X509Source {
        let build = X509Source::builder().endpoint(self.api.endpoint()).build();
        bounded("X509Source initial sync", build).await.unwrap()
    }
}

fn update(ca: &mut TestCa, id: &str) -> X509Update {
    X509Update::new(&ca.issue(id).unwrap(), &ca.bundle_set().unwrap())
}

fn concat(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// An update whose certificate is `id`'s but whose key belongs to another SVID: it parses,
/// so the `spiffe` crate accepts it, but it cannot be used for TLS.
fn mismatched_key(ca: &mut TestCa, id: &str) -> X509Update {
    let svid = ca.issue(id).unwrap();
    let other = ca.issue("spiffe://example.org/someone-else").unwrap();
    X509Update::from_der(
        id,
        concat(svid.chain()),
        other.key().secret_der().to_vec(),
        concat(ca.bundle().unwrap().certs()),
    )
}

#[tokio::test]
async fn x509_source_receives_the_svid_and_bundles() {
    let mut agent = Agent::start();
    let svid = agent.ca.issue("spiffe://example.org/web").unwrap();
    let other_ca = TestCa::new("other.org").unwrap();
    agent.api.push(
        X509Update::new(&svid, &agent.ca.bundle_set().unwrap())
            .with_federated_bundle(other_ca.trust_domain(), &other_ca.bundle().unwrap())
            .with_hint("internal"),
    );

    let source = agent.x509_source().await;
    let got = source.svid().unwrap();
    assert_eq!(got.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(got.hint(), Some("internal"));
    let chain: Vec<&[u8]> = got.cert_chain().iter().map(|c| c.as_bytes()).collect();
    let expected: Vec<&[u8]> = svid.chain().iter().map(|c| c.as_ref()).collect();
    assert_eq!(chain, expected);
    assert_eq!(got.private_key().as_bytes(), svid.key().secret_der());

    let own = source
        .bundle_for_trust_domain(agent.ca.trust_domain())
        .unwrap()
        .expect("own bundle");
    assert_eq!(own.authorities().len(), 1);
    assert_eq!(own.authorities()[0].as_bytes(), agent.ca.root().as_ref());
    let federated = source
        .bundle_for_trust_domain(other_ca.trust_domain())
        .unwrap()
        .expect("federated bundle");
    assert_eq!(
        federated.authorities()[0].as_bytes(),
        other_ca.root().as_ref()
    );
    assert_eq!(agent.api.open_streams(), 1);

    // The one-shot client calls, FetchX509Bundles included.
    let client = bounded(
        "connect",
        WorkloadApiClient::connect_to(agent.api.endpoint()),
    )
    .await
    .unwrap();
    let context = bounded("fetch context", client.fetch_x509_context())
        .await
        .unwrap();
    assert_eq!(context.bundle_set().len(), 2);
    let bundles = bounded("fetch bundles", client.fetch_x509_bundles())
        .await
        .unwrap();
    assert_eq!(bundles.len(), 2);
    assert!(bundles.get(agent.ca.trust_domain()).is_some());

    source.shutdown().await;
    agent.api.shutdown().await;
}

#[tokio::test]
async fn x509_source_observes_rotations() {
    observes_rotations(Agent::start()).await;
}

/// The Workload API's other transport, `tcp://IP:PORT` (the one Windows has).
#[tokio::test]
async fn x509_source_observes_rotations_over_tcp() {
    observes_rotations(Agent::start_on(Transport::Tcp)).await;
}

async fn observes_rotations(mut agent: Agent) {
    let source = agent.x509_source().await;
    let mut updates = source.updated();

    // A new SVID (new ID and certificate).
    let rotated = agent.push("spiffe://example.org/web-v2");
    bounded("SVID rotation", updates.changed()).await.unwrap();
    let got = source.svid().unwrap();
    assert_eq!(got.spiffe_id().to_string(), "spiffe://example.org/web-v2");
    assert_eq!(got.leaf().as_bytes(), rotated.chain()[0].as_ref());

    // A trust-anchor rotation: during the overlap the bundle holds both roots.
    agent.ca.begin_rotation().unwrap();
    agent.push("spiffe://example.org/web-v2");
    bounded("root rotation", updates.changed()).await.unwrap();
    let bundle = source
        .bundle_for_trust_domain(agent.ca.trust_domain())
        .unwrap()
        .unwrap();
    assert_eq!(bundle.authorities().len(), 2);
    assert_eq!(bundle.authorities()[0].as_bytes(), agent.ca.root().as_ref());

    source.shutdown().await;
    agent.api.shutdown().await;
}

#[tokio::test]
async fn calls_without_the_security_header_are_refused() {
    let agent = Agent::start();
    // tonic names a TCP address `http://`.
    let uri = agent.api.endpoint().replace("tcp://", "http://");
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A raw client: `()` encodes as the empty request messages, and decodes any response.
    let call = |path: &'static str, header: bool| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.unwrap();
            let mut request = tonic::Request::new(());
            if header {
                request
                    .metadata_mut()
                    .insert(SECURITY_HEADER, "true".parse().unwrap());
            }
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            let response = grpc
                .server_streaming(request, PathAndQuery::from_static(path), codec)
                .await?;
            let mut stream = response.into_inner();
            stream.message().await
        }
    };

    for path in [
        "/SpiffeWorkloadAPI/FetchX509SVID",
        "/SpiffeWorkloadAPI/FetchX509Bundles",
    ] {
        let refused = bounded(path, call(path, false)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{path}");
        assert!(refused.message().contains("security header"), "{refused:?}");
        // The same call with the header gets a response.
        let served = bounded(path, call(path, true)).await.unwrap();
        assert!(served.is_some(), "{path}");
    }
    let jwt = bounded("JWT", call("/SpiffeWorkloadAPI/FetchJWTBundles", true))
        .await
        .unwrap_err();
    assert_eq!(jwt.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn spire_source_feeds_mtls_and_follows_rotation() {
    feeds_mtls_and_follows_rotation(Agent::start()).await;
}

#[tokio::test]
async fn spire_source_over_tcp_feeds_mtls_and_follows_rotation() {
    feeds_mtls_and_follows_rotation(Agent::start_on(Transport::Tcp)).await;
}

async fn feeds_mtls_and_follows_rotation(mut agent: Agent) {
    let spire = agent.spire().await;
    let spire = Arc::new(spire);
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web"
    );
    assert!(spire.bundles().get(agent.ca.trust_domain()).is_some());
    let mut updates = spire.updates();

    // Client credentials from SPIRE, server credentials from a plain store.
    let server = Mtls::new(CredentialStore::with(
        agent.ca.issue("spiffe://example.org/api").unwrap(),
        agent.ca.bundle_set().unwrap(),
    ));
    let client = Mtls::from_arc(spire.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = MtlsAcceptor::new(
        &server,
        Authorizer::trust_domain(agent.ca.trust_domain().clone()),
    )
    .unwrap()
    .incoming(listener);
    let api_id = mesh_core::SpiffeId::new("spiffe://example.org/api").unwrap();
    let connector = MtlsConnector::new(&client, api_id).unwrap();

    let (_stream, server_id) = bounded("connect", connector.connect(addr)).await.unwrap();
    assert_eq!(server_id.to_string(), "spiffe://example.org/api");
    let accepted = bounded("accept", incoming.next()).await.unwrap().unwrap();
    assert_eq!(accepted.peer.to_string(), "spiffe://example.org/web");

    // Rotation reaches the store, and the next handshake presents the new SVID.
    agent.push("spiffe://example.org/web-v2");
    bounded("store update", updates.changed()).await.unwrap();
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-v2"
    );
    let _ = bounded("connect", connector.connect(addr)).await.unwrap();
    let accepted = bounded("accept", incoming.next()).await.unwrap().unwrap();
    assert_eq!(accepted.peer.to_string(), "spiffe://example.org/web-v2");

    // An unusable update (a key that does not match) keeps the last good credentials. A
    // second client shows when the agent's update has gone out.
    let observer = agent.x509_source().await;
    let mut observed = observer.updated();
    let bad = mismatched_key(&mut agent.ca, "spiffe://example.org/web-v3");
    agent.api.push(bad);
    bounded("bad update sent", observed.changed())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!updates.has_changed().unwrap(), "bad update was published");
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-v2"
    );
    let _ = bounded("connect", connector.connect(addr)).await.unwrap();
    let accepted = bounded("accept", incoming.next()).await.unwrap().unwrap();
    assert_eq!(accepted.peer.to_string(), "spiffe://example.org/web-v2");

    // And a good one after it is taken.
    agent.push("spiffe://example.org/web-v4");
    bounded("store update", updates.changed()).await.unwrap();
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-v4"
    );

    observer.shutdown().await;
    spire.shutdown().await;
    agent.api.shutdown().await;
}

/// A federated bundle the store cannot use (empty: that trust domain has no X.509
/// authorities) is left out of an update, not a reason to refuse it: the SVID still
/// rotates and the other bundles are taken. A federation the agent drops is dropped.
#[tokio::test]
async fn a_bad_federated_bundle_does_not_stop_rotation() {
    let mut agent = Agent::start();
    let spire = agent.spire().await;
    let mut updates = spire.updates();
    let third = TestCa::new("third.org").unwrap();
    let svid = agent.ca.issue("spiffe://example.org/web-v2").unwrap();
    let update = X509Update::new(&svid, &agent.ca.bundle_set().unwrap())
        .with_federated_bundle(third.trust_domain(), &third.bundle().unwrap())
        .with_raw_federated_bundle("spiffe://other.org", Vec::new());
    agent.api.push(update);
    bounded("store update", updates.changed()).await.unwrap();
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-v2"
    );
    let bundles = spire.bundles();
    let domains: Vec<String> = bundles.trust_domains().map(|t| t.to_string()).collect();
    assert!(
        bundles.get(agent.ca.trust_domain()).is_some(),
        "{domains:?}"
    );
    assert!(bundles.get(third.trust_domain()).is_some(), "{domains:?}");
    assert_eq!(bundles.len(), 2, "{domains:?}");

    // The federation with third.org ends, in an update whose SVID our checks refuse (its
    // key is another's): the SVID is not taken, the end of the federation is.
    let bad = mismatched_key(&mut agent.ca, "spiffe://example.org/web-v3");
    agent.api.push(bad);
    bounded("store update", updates.changed()).await.unwrap();
    assert!(spire.bundles().get(third.trust_domain()).is_none());
    assert!(spire.bundles().get(agent.ca.trust_domain()).is_some());
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-v2"
    );
    // It comes back in an update whose SVID has expired by this host's clock: the same.
    let hour = Duration::from_secs(3600);
    let expired = agent
        .ca
        .leaf()
        .uri("spiffe://example.org/web-v4")
        .validity(SystemTime::now() - 2 * hour, SystemTime::now() - hour)
        .build()
        .unwrap();
    agent.api.push(
        X509Update::new(&expired, &agent.ca.bundle_set().unwrap())
            .with_federated_bundle(third.trust_domain(), &third.bundle().unwrap()),
    );
    bounded("store update", updates.changed()).await.unwrap();
    assert!(spire.bundles().get(third.trust_domain()).is_some());
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-v2"
    );
    spire.shutdown().await;
    agent.api.shutdown().await;
}

/// An agent that withdraws the workload's identity (PERMISSION_DENIED: its registration
/// entry was deleted) takes it away: once the grace has passed without the identity given
/// back, the source holds no SVID and no bundles, so handshakes fail closed; when the agent
/// issues one again, it is published.
#[tokio::test]
async fn a_withdrawn_identity_is_dropped_after_the_grace_and_comes_back_when_reissued() {
    let mut agent = Agent::start();
    let spire = SpireSource::builder()
        .endpoint(agent.api.endpoint())
        .initial_timeout(WAIT)
        .withdrawal_grace(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let spire = Arc::new(spire);
    let mut updates = spire.updates();
    // A server trusting the agent's domain, and a client with the workload's credentials.
    let server = Mtls::new(CredentialStore::with(
        agent.ca.issue("spiffe://example.org/api").unwrap(),
        agent.ca.bundle_set().unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = MtlsAcceptor::new(
        &server,
        Authorizer::trust_domain(agent.ca.trust_domain().clone()),
    )
    .unwrap()
    .incoming(listener);
    let api_id = mesh_core::SpiffeId::new("spiffe://example.org/api").unwrap();
    let connector = MtlsConnector::new(&Mtls::from_arc(spire.clone()), api_id).unwrap();
    let _ = bounded("connect", connector.connect(addr)).await.unwrap();
    let _ = bounded("accept", incoming.next()).await.unwrap().unwrap();
    agent.api.push(X509Update::permission_denied());
    bounded("credentials dropped", async {
        while spire.svid().is_some() {
            updates.changed().await.unwrap();
        }
    })
    .await;
    assert!(spire.bundles().is_empty());
    // The workload can no longer make a handshake.
    assert!(bounded("connect", connector.connect(addr)).await.is_err());
    // Issued again: published, though it may be the very SVID withdrawn before.
    agent.push("spiffe://example.org/web-again");
    bounded("credentials back", async {
        while spire.svid().is_none() {
            updates.changed().await.unwrap();
        }
    })
    .await;
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-again"
    );
    assert!(spire.bundles().get(agent.ca.trust_domain()).is_some());
    spire.shutdown().await;
    agent.api.shutdown().await;
}

/// A withdrawal the agent takes back within the grace costs nothing: the identity it
/// issues again is published, and the credentials are not dropped when the grace ends.
#[tokio::test]
async fn an_identity_given_back_within_the_grace_is_kept() {
    let mut agent = Agent::start();
    let grace = Duration::from_millis(300);
    let spire = SpireSource::builder()
        .endpoint(agent.api.endpoint())
        .initial_timeout(WAIT)
        .withdrawal_grace(grace)
        .build()
        .await
        .unwrap();
    let mut updates = spire.updates();
    // A second client shows when the withdrawal has gone out.
    let observer = agent.x509_source().await;
    let mut observed = observer.updated();
    agent.api.push(X509Update::permission_denied());
    bounded("withdrawal seen", async {
        while observer.state().withdrawal().is_none() {
            observed.changed().await.unwrap();
        }
    })
    .await;
    agent.push("spiffe://example.org/web-back");
    bounded("identity back", async {
        while spire.svid().map(|s| s.id().to_string()).as_deref()
            != Some("spiffe://example.org/web-back")
        {
            updates.changed().await.unwrap();
        }
    })
    .await;
    // Well past the grace: nothing dropped.
    tokio::time::sleep(grace * 3).await;
    assert!(spire.svid().is_some());
    assert!(spire.bundles().get(agent.ca.trust_domain()).is_some());
    observer.shutdown().await;
    spire.shutdown().await;
    agent.api.shutdown().await;
}

#[tokio::test]
async fn spire_source_waits_for_a_usable_first_svid() {
    let mut agent = Agent::start();
    let bad = mismatched_key(&mut agent.ca, "spiffe://example.org/web");
    agent.api.push(bad);

    // Only unusable SVIDs within the timeout: an error that says why.
    let error = SpireSource::builder()
        .endpoint(agent.api.endpoint())
        .initial_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(error, SpireError::Unusable { .. }), "{error}");
    assert!(error.to_string().contains("private key"), "{error}");

    // A usable one arriving within the timeout is taken.
    let build = SpireSource::builder()
        .endpoint(agent.api.endpoint())
        .initial_timeout(WAIT)
        .build();
    let build = tokio::spawn(build);
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.push("spiffe://example.org/web-v2");
    let spire = bounded("SpireSource", build).await.unwrap().unwrap();
    assert_eq!(
        spire.svid().unwrap().id().to_string(),
        "spiffe://example.org/web-v2"
    );
}

#[tokio::test]
async fn spire_source_times_out_without_an_agent() {
    #[cfg(unix)]
    let dir = tempfile::tempdir().unwrap();
    #[cfg(unix)]
    let endpoint = format!("unix://{}", dir.path().join("nobody.sock").display());
    // Elsewhere a port nothing listens on (bound, then released).
    #[cfg(not(unix))]
    let endpoint = {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("tcp://127.0.0.1:{port}")
    };
    let error = SpireSource::builder()
        .endpoint(endpoint)
        .initial_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(error, SpireError::Timeout(_)), "{error}");
}
