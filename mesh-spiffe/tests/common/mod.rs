//! Helpers shared by the TLS integration tests: stores, an echo server, and deliberately
//! misbehaving peers built on raw rustls.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::transport::{Accepted, HandshakeError};
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor, Svid, TransportError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub fn store(ca: &mut TestCa, id: &str) -> Arc<CredentialStore> {
    Arc::new(CredentialStore::with(
        ca.issue(id).unwrap(),
        ca.bundle_set().unwrap(),
    ))
}

pub fn mtls(store: &Arc<CredentialStore>) -> Mtls {
    Mtls::from_arc(store.clone())
}

/// What the server saw: accepted peers' IDs, or handshake errors.
pub type Seen = mpsc::UnboundedReceiver<Result<String, HandshakeError>>;

/// Starts an echo server (each 4-byte message is sent back) behind `acceptor`.
pub async fn echo_server(acceptor: MtlsAcceptor) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = acceptor.incoming(listener);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(outcome) = incoming.next().await {
            match outcome {
                Ok(Accepted {
                    mut stream, peer, ..
                }) => {
                    let _ = tx.send(Ok(peer.to_string()));
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4];
                        while stream.read_exact(&mut buf).await.is_ok() {
                            if stream.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        }
    });
    (addr, rx)
}

/// One request/response on an established stream.
pub async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    n: u32,
) -> std::io::Result<()> {
    stream.write_all(&n.to_be_bytes()).await?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await?;
    assert_eq!(u32::from_be_bytes(buf), n);
    Ok(())
}

/// A verifier that accepts any server: only for playing a misbehaving client.
#[derive(Debug)]
pub struct DangerAcceptAnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for DangerAcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    mesh_spiffe::tls::default_provider()
}

/// A client presenting exactly `chain` and `key`, verifying nothing: connects to `addr` and
/// returns the client-side outcome.
pub async fn raw_client(
    addr: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), std::io::Error> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DangerAcceptAnyServer(
            provider.signature_verification_algorithms,
        )))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    // In TLS 1.3 a client certificate is refused after the client's handshake finished:
    // the refusal arrives on the first read.
    ping(&mut tls, 1).await
}

/// A server presenting exactly `chain` and `key`, asking for no client certificate.
pub async fn raw_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

/// The `VerifyError` text of a transport error, or its whole text.
pub fn reason(err: &TransportError) -> String {
    match err {
        TransportError::Verify(v) => format!("verify: {v}"),
        other => other.to_string(),
    }
}

pub fn authorizer_any_in(ca: &TestCa) -> Authorizer {
    Authorizer::trust_domain(ca.trust_domain().clone())
}

pub fn svid_parts(svid: &Svid) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (svid.chain().to_vec(), svid.key().clone_key())
}
