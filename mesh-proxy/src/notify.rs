//! systemd's readiness protocol (`sd_notify`), for `Type=notify` units.
//!
//! When the service manager starts the proxy with `NOTIFY_SOCKET` set, the proxy sends it
//! one datagram per state change: `READY=1` once every listener is bound and the identity
//! is held (so units ordered `After=mesh-proxy.service` start when the mesh is usable,
//! not when the process was forked), `STOPPING=1` when it begins to drain, and a
//! human-readable `STATUS=` with each (shown by `systemctl status`), and while it waits
//! for its identity. Without `NOTIFY_SOCKET` nothing is sent. The socket is a path or, on
//! Linux, an abstract name (a leading `@`). A send never blocks (a full queue is a failed
//! send); a failure is logged as an error and otherwise ignored: the proxy serves on, and
//! a unit that waits for `READY=1` then says why it timed out. Other platforms send
//! nothing.

/// Sends `state` (newline-separated `KEY=value` assignments) to the service manager, if
/// one asked for it.
pub(crate) fn notify(state: &str) {
    #[cfg(unix)]
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(error) = unix::send(&socket, state) {
            tracing::error!(socket = ?socket, %error, state, "cannot notify the service manager");
        } else {
            tracing::debug!(state, "notified the service manager");
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

#[cfg(unix)]
mod unix {
    use std::ffi::OsStr;
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;

    pub(super) fn send(socket: &OsStr, state: &str) -> io::Result<()> {
        let sender = UnixDatagram::unbound()?;
        sender.set_nonblocking(true)?;
        let bytes = socket.as_bytes();
        let sent = match bytes.first() {
            Some(b'/') => sender.send_to(state.as_bytes(), socket)?,
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Some(b'@') => {
                #[cfg(target_os = "android")]
                use std::os::android::net::SocketAddrExt;
                #[cfg(target_os = "linux")]
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
                sender.send_to_addr(state.as_bytes(), &addr)?
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@...)",
                ));
            }
        };
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the notification was truncated",
            ));
        }
        Ok(())
    }
}
