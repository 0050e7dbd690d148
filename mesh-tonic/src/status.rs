//! Errors of the mesh client stack as [`tonic::Status`], with the code gRPC defines for
//! each cause.
//!
//! tonic's generated clients turn a channel error into a `Status` by downcasting it, and
//! without tonic's own transport every other error becomes `UNKNOWN`. [`MeshChannel`]
//! therefore returns `Status` itself, mapped here once, from the first cause in the
//! error's chain that says what happened:
//!
//! | cause | code |
//! |---|---|
//! | a `Status` (from the body or a layer) | its own |
//! | [`RequestTimeout`], [`DeadlineExceeded`], the call's deadline | `DEADLINE_EXCEEDED` |
//! | an HTTP/2 reset: `REFUSED_STREAM` / `CANCEL` / `ENHANCE_YOUR_CALM` / `INADEQUATE_SECURITY` / other | `UNAVAILABLE` / `CANCELLED` / `RESOURCE_EXHAUSTED` / `PERMISSION_DENIED` / `INTERNAL` (gRPC's PROTOCOL-HTTP2) |
//! | an HTTP/2 `GOAWAY`, whatever its code (the connection went away: a stream past its last stream ID was never processed) | `UNAVAILABLE` |
//! | no endpoints, no ready endpoint, a try timeout, a failed connect, a lost connection | `UNAVAILABLE` |
//! | anything else | `UNKNOWN` |
//!
//! [`BudgetExhausted`] takes the code of the last try's error. The message names the
//! service and the cause (`users: no ready endpoint for `users` within 3.0s: …`), and the
//! original error stays reachable as the status's `source()`.
//!
//! Answers from servers need no mapping: a denied call (`PERMISSION_DENIED`) or a rate
//! limited one (`RESOURCE_EXHAUSTED`) comes back as a gRPC status that tonic reads itself.
//!
//! [`MeshChannel`]: crate::MeshChannel
//! [`RequestTimeout`]: mesh_tower::timeout::RequestTimeout
//! [`DeadlineExceeded`]: mesh_tower::timeout::DeadlineExceeded
//! [`BudgetExhausted`]: mesh_tower::client::error::BudgetExhausted

use std::error::Error;
use std::sync::Arc;

use mesh_core::error::{BoxError, find_cause};
use mesh_tower::client::error::{ConnectError, NoEndpoints, NoReadyEndpoints, SendError};
use mesh_tower::timeout::{DeadlineExceeded, RequestTimeout, TryTimeout};
use tonic::{Code, Status};

/// The [`Status`] a caller of `service` gets for `error`; see the [module docs](self).
pub fn status_from_error(error: BoxError, service: &str) -> Status {
    let error = match error.downcast::<Status>() {
        Ok(status) => return *status,
        Err(error) => error,
    };
    let code = code_of(&*error);
    let mut status = Status::new(code, format!("{service}: {error}"));
    status.set_source(Arc::from(error));
    status
}

/// The gRPC code of the first cause in `error`'s chain that has one.
pub fn code_of(error: &(dyn Error + 'static)) -> Code {
    if is::<RequestTimeout>(error) || is::<DeadlineExceeded>(error) {
        return Code::DeadlineExceeded;
    }
    if let Some(h2) = find_cause::<h2::Error>(error) {
        // A GOAWAY's code speaks of the connection, not of the stream: the stream was
        // refused unprocessed (the server is draining, or going away), UNAVAILABLE as
        // gRPC clients report it. Only a reset's code is mapped as PROTOCOL-HTTP2 says.
        if h2.is_go_away() {
            return Code::Unavailable;
        }
        if let Some(reason) = h2.reason() {
            return code_of_reset(reason);
        }
    }
    if let Some(status) = find_cause::<Status>(error) {
        return status.code();
    }
    if is::<TryTimeout>(error)
        || is::<NoEndpoints>(error)
        || is::<NoReadyEndpoints>(error)
        || is::<ConnectError>(error)
        || is::<SendError>(error)
        || is::<hyper::Error>(error)
        || is::<h2::Error>(error)
        || is::<std::io::Error>(error)
    {
        return Code::Unavailable;
    }
    Code::Unknown
}

/// gRPC's mapping of an HTTP/2 `RST_STREAM` error code (PROTOCOL-HTTP2, "Errors").
pub fn code_of_reset(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

fn is<E: Error + 'static>(error: &(dyn Error + 'static)) -> bool {
    find_cause::<E>(error).is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use mesh_tower::client::error::BudgetExhausted;

    use super::*;

    #[test]
    fn causes_map_to_their_codes_and_messages_name_the_service() {
        let status = status_from_error(Box::new(RequestTimeout(Duration::from_secs(1))), "users");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(status.message(), "users: request timed out after 1s");
        assert!(status.source().is_some());

        let unsent = status_from_error(Box::new(DeadlineExceeded), "users");
        assert_eq!(unsent.code(), Code::DeadlineExceeded);

        let none = NoEndpoints {
            service: "users".into(),
        };
        let status = status_from_error(Box::new(none), "users");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "users: no endpoints for `users`");

        let budget = BudgetExhausted(Box::new(TryTimeout(Duration::from_millis(50))));
        let status = status_from_error(Box::new(budget), "users");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("retry budget exhausted"),
            "{status}"
        );

        let reset: BoxError = Box::new(h2::Error::from(h2::Reason::CANCEL));
        assert_eq!(status_from_error(reset, "users").code(), Code::Cancelled);
        let calm: BoxError = Box::new(h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM));
        assert_eq!(code_of(&*calm), Code::ResourceExhausted);

        let io: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(code_of(&*io), Code::Unavailable);
        let other: BoxError = "something else".into();
        assert_eq!(code_of(&*other), Code::Unknown);

        let own = status_from_error(Box::new(Status::not_found("gone")), "users");
        assert_eq!((own.code(), own.message()), (Code::NotFound, "gone"));
    }

    /// A call refused by a server's GOAWAY (here `NO_ERROR`: a graceful shutdown, and
    /// `ENHANCE_YOUR_CALM`, which as a reset is RESOURCE_EXHAUSTED) is UNAVAILABLE, as
    /// grpc-go reports it, not the reset table's INTERNAL.
    #[tokio::test]
    async fn a_goaway_is_unavailable_whatever_its_code() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for code in [0u8, 0xb] {
            let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
            let server = tokio::spawn(async move {
                // An empty SETTINGS, then GOAWAY(last stream 0, `code`): no stream is served.
                let mut frames = vec![0, 0, 0, 4, 0, 0, 0, 0, 0];
                frames.extend([0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, code]);
                server_io.write_all(&frames).await.unwrap();
                let mut sink = [0; 1024];
                while matches!(server_io.read(&mut sink).await, Ok(n) if n > 0) {}
            });
            let (send, conn) = h2::client::handshake(client_io).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let request = http::Request::post("http://users/a.B/C").body(()).unwrap();
            let error = match send.ready().await {
                Err(error) => error,
                Ok(mut ready) => match ready.send_request(request, true) {
                    Err(error) => error,
                    Ok((response, _)) => response.await.unwrap_err(),
                },
            };
            assert!(error.is_go_away(), "{error:?}");
            let boxed: BoxError = Box::new(error);
            assert_eq!(code_of(&*boxed), Code::Unavailable, "GOAWAY code {code}");
            server.abort();
        }
    }
}
