use std::time::Duration;

/// The protective limits of a [`MeshServer`](super::MeshServer). Every field has a safe
/// default; tighten or loosen them per listener.
///
/// # Defaults
/// | limit | default | when exceeded |
/// |---|---|---|
/// | `header_read_timeout` | 10 s | the connection closes, HTTP/1.1 with a 408 (slowloris); counted from a request head's first byte, so that the silence between keep-alive requests is left to `idle_timeout`; also bounds the wait for a new connection's first request |
/// | `max_header_list_size` | 64 KiB | HTTP/1.1: 431; HTTP/2: the stream is refused with 431 |
/// | `max_headers` | 100 (HTTP/1.1) | 431 |
/// | `max_request_body_size` | 64 MiB (`None`: no bound) | a request declaring a larger `Content-Length` gets 413 (a gRPC call `RESOURCE_EXHAUSTED`) before the application sees it; a streamed body of unknown length is the application's to bound |
/// | `max_connections` | 10,000 | the oldest *newcomer* is closed to accept the next connection: one whose handshake has not verified a client certificate and whose first request has not begun (a client that connects and stalls cannot lock callers out); when every connection is established, accepting waits until one closes |
/// | `max_concurrent_streams` | 256 (HTTP/2) | the client must wait (SETTINGS) |
/// | `keep_alive_interval` / `keep_alive_timeout` | 20 s / 20 s (HTTP/2 pings) | a peer that stops answering pings is disconnected |
/// | `idle_timeout` | 120 s | a connection with no request in flight, and no response body (a streamed response is in flight until its last frame), for that long is shut down gracefully (looked for every eighth of it: the close comes within `idle_timeout` × 1.125). A connection whose client stops reading for as long is closed, shutting down or not: something waits on the client (a write; with nothing of the application's at work, every response body in flight to be asked for its next piece, as when an HTTP/2 window stays shut; or, shutting down, what is left in the buffers) and it makes no progress (no body polled, under 1 KiB moved per check, so that HTTP/2 pings do not count), like nginx's `send_timeout` (a reader is seen through the socket: one reading less than about a third of the kernel's send buffer in that time is taken for one that stopped). A response that is only quiet, between a stream's messages, waits on the application and is not cut |
/// | `max_pending_accept_reset_streams` | 20 (HTTP/2) | rapid reset (CVE-2023-44487): the connection is closed with `GOAWAY` |
/// | `max_local_error_reset_streams` | 256 (HTTP/2) | a peer provoking stream errors is disconnected |
/// | `max_cancelled_requests` | 20 | a connection whose client cancelled (reset, or hung up on) this many requests, more than it let finish, is shut down with `GOAWAY`, and closed once it cancels as many more: rapid reset of accepted streams. On HTTP/2 only cancellations within `premature_cancel_window` of their request's start count |
/// | `premature_cancel_window` | 1 s | an HTTP/2 request cancelled later than this after it began is not counted toward `max_cancelled_requests`: a client (another proxy, say) timing out slow requests is not taken for an attacker, and one holding each stream this long stays bound by `max_concurrent_streams`. Envoy's default |
/// | `shutdown_timeout` | 30 s | after a shutdown begins, connections still open are closed |
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerLimits {
    /// Bound on reading a request's headers, and on a new connection's first bytes.
    pub header_read_timeout: Duration,
    /// Bound on the size of a request's header block, in bytes.
    pub max_header_list_size: u32,
    /// Bound on the number of headers of an HTTP/1.1 request.
    pub max_headers: usize,
    /// Bound on a request body's declared size, in bytes.
    pub max_request_body_size: Option<u64>,
    /// Bound on open connections (TLS handshakes included; see the table for newcomers).
    pub max_connections: usize,
    /// Bound on concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings (`None`: no pings).
    pub keep_alive_interval: Option<Duration>,
    /// How long a ping may go unanswered.
    pub keep_alive_timeout: Duration,
    /// How long a connection may have no request or response in flight, and how long its
    /// client may stop reading.
    pub idle_timeout: Duration,
    /// Bound on HTTP/2 streams a client opened and reset before the server accepted them.
    pub max_pending_accept_reset_streams: usize,
    /// Bound on HTTP/2 streams the server had to reset because of the client's errors.
    pub max_local_error_reset_streams: usize,
    /// Bound on requests a connection's client cancels, once they outnumber those it let
    /// finish.
    pub max_cancelled_requests: usize,
    /// How soon after its start an HTTP/2 request's cancellation must come to count toward
    /// `max_cancelled_requests` (zero: none does, and the bound is off for HTTP/2; an
    /// HTTP/1.1 client that cancels hangs up, which ends its connection anyway).
    pub premature_cancel_window: Duration,
    /// How long a graceful shutdown waits for requests in flight.
    pub shutdown_timeout: Duration,
}

impl ServerLimits {
    /// These limits with every limit `config` sets replacing the one here.
    #[must_use]
    pub fn with_config(mut self, config: &mesh_core::config::ListenerLimits) -> Self {
        if let Some(v) = config.header_read_timeout {
            self.header_read_timeout = v;
        }
        if let Some(v) = config.max_header_list_size {
            self.max_header_list_size = v;
        }
        if let Some(v) = config.max_headers {
            self.max_headers = v;
        }
        if let Some(v) = config.max_request_body_size {
            self.max_request_body_size = Some(v);
        }
        if let Some(v) = config.max_connections {
            self.max_connections = v;
        }
        if let Some(v) = config.max_concurrent_streams {
            self.max_concurrent_streams = v;
        }
        if let Some(v) = config.idle_timeout {
            self.idle_timeout = v;
        }
        if let Some(v) = config.max_cancelled_requests {
            self.max_cancelled_requests = v;
        }
        if let Some(v) = config.premature_cancel_window {
            self.premature_cancel_window = v;
        }
        self
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_list_size: 64 * 1024,
            max_headers: 100,
            max_request_body_size: Some(64 * 1024 * 1024),
            max_connections: 10_000,
            max_concurrent_streams: 256,
            keep_alive_interval: Some(Duration::from_secs(20)),
            keep_alive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(120),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 256,
            max_cancelled_requests: 20,
            premature_cancel_window: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sets_the_cancellation_bound() {
        let config: mesh_core::config::ListenerLimits =
            toml::from_str("max_cancelled_requests = 7\npremature_cancel_window = \"0s\"\n")
                .unwrap();
        let limits = ServerLimits::default().with_config(&config);
        assert_eq!(limits.max_cancelled_requests, 7);
        assert_eq!(limits.premature_cancel_window, Duration::ZERO);
        // Unset keys keep the defaults.
        let limits =
            ServerLimits::default().with_config(&mesh_core::config::ListenerLimits::default());
        assert_eq!(limits, ServerLimits::default());
    }
}
