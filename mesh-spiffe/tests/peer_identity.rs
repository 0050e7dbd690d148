//! The verified peer identity reaches HTTP handlers as a typed request extension, over
//! HTTP/2 negotiated by ALPN, and a header cannot forge it.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;

use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::identity::SpiffeId;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{MtlsAcceptor, MtlsConnector, PeerIdentity};

async fn whoami(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let who = match req.extensions().get::<PeerIdentity>() {
        Some(peer) => peer.to_string(),
        None => "anonymous".to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(who))))
}

#[tokio::test]
async fn handlers_read_the_peer_identity_from_request_extensions() {
    let mut ca = TestCa::new("example.org").unwrap();
    let server = store(&mut ca, "spiffe://example.org/api");
    let client = store(&mut ca, "spiffe://example.org/web");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = MtlsAcceptor::new(&mtls(&server), authorizer_any_in(&ca))
        .unwrap()
        .incoming(listener);
    tokio::spawn(async move {
        while let Some(Ok(accepted)) = incoming.next().await {
            assert_eq!(
                accepted.stream.get_ref().1.alpn_protocol(),
                Some(&b"h2"[..])
            );
            let peer = accepted.peer;
            let service = service_fn(move |mut req: Request<Incoming>| {
                // Whatever the client sent, the extension is the verified identity.
                req.extensions_mut().insert(peer.clone());
                whoami(req)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(accepted.stream), service),
            );
        }
    });

    let connector = MtlsConnector::new(
        &mtls(&client),
        SpiffeId::new("spiffe://example.org/api").unwrap(),
    )
    .unwrap();
    let (stream, _) = connector.connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for forged in [None, Some("spiffe://example.org/admin")] {
        let mut req = Request::builder().uri("https://api/whoami");
        if let Some(f) = forged {
            req = req
                .header("x-peer-identity", f)
                .header("x-forwarded-client-cert", f);
        }
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"spiffe://example.org/web");
    }
}
