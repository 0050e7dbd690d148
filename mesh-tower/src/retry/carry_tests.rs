//! What every try of a request carries, the first or not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use mesh_core::error::BoxError;
use tower::{ServiceBuilder, ServiceExt};

use super::{ReplayBody, RetryLayer};
use crate::connect::{ConnectError, SendError};

#[tokio::test(start_paused = true)]
async fn a_retried_extended_connect_keeps_its_protocol() {
    // The first try finds no connection; the second is answered.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let client = ServiceBuilder::new()
        .layer(RetryLayer::default())
        .service_fn(move |req: Request<ReplayBody>| {
            let mut tries = record.lock().unwrap();
            tries.push((
                req.method().clone(),
                req.extensions()
                    .get::<hyper::ext::Protocol>()
                    .map(|p| p.as_str().to_owned()),
            ));
            let first = tries.len() == 1;
            async move {
                if first {
                    let addr = "127.0.0.1:9".parse().unwrap();
                    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                    let cause = ConnectError::Tcp {
                        addr,
                        source: refused,
                    };
                    return Err::<Response<()>, BoxError>(
                        SendError::connect(addr, Arc::new(cause)).into(),
                    );
                }
                Ok(Response::new(()))
            }
        });
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("http://chat.example/room")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = client.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let tries = seen.lock().unwrap().clone();
    let websocket = (Method::CONNECT, Some("websocket".to_owned()));
    assert_eq!(tries, [websocket.clone(), websocket]);
}
