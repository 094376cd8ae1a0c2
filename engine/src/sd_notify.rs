//! systemd's readiness protocol (`sd_notify(3)`): one datagram of `KEY=value` lines to the unix
//! socket named by `$NOTIFY_SOCKET`. Without that variable (not started by systemd with
//! `Type=notify`) every call does nothing.

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// The service is ready: listeners bound, store recovered.
pub const READY: &str = "READY=1";
/// The service is stopping (draining).
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` (newline-separated `KEY=value` assignments) to `$NOTIFY_SOCKET`. Returns
/// whether a message was sent: false when not running under systemd's notify protocol.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_to(std::env::var_os("NOTIFY_SOCKET").as_deref(), state)
}

/// [`notify`] with the socket given: an absolute path, or `@name` for an abstract socket.
pub fn notify_to(socket: Option<&OsStr>, state: &str) -> io::Result<bool> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let datagram = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        abstract_send(&datagram, name, state.as_bytes())?
    } else if bytes.starts_with(b"/") {
        datagram.send_to(state.as_bytes(), socket)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET={} is neither an absolute path nor an abstract socket (@name)",
                socket.to_string_lossy()
            ),
        ));
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification datagram truncated",
        ));
    }
    Ok(true)
}

#[cfg(target_os = "linux")]
fn abstract_send(datagram: &UnixDatagram, name: &[u8], message: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    datagram.send_to_addr(message, &address)
}

#[cfg(not(target_os = "linux"))]
fn abstract_send(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn received(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        assert!(!notify_to(None, READY).unwrap());
        assert!(!notify_to(Some(OsStr::new("")), READY).unwrap());
    }

    #[test]
    fn a_path_socket_receives_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        assert!(notify_to(Some(path.as_os_str()), "READY=1\nSTATUS=up").unwrap());
        assert_eq!(received(&listener), "READY=1\nSTATUS=up");
    }

    #[test]
    fn an_abstract_socket_receives_the_message() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ferry-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&address).unwrap();
        let socket = format!("@{name}");
        assert!(notify_to(Some(OsStr::new(&socket)), STOPPING).unwrap());
        assert_eq!(received(&listener), STOPPING);
    }

    #[test]
    fn a_relative_socket_is_refused_and_a_missing_one_is_an_error() {
        let err = notify_to(Some(OsStr::new("notify.sock")), READY).unwrap_err();
        assert!(
            err.to_string().contains("neither an absolute path"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.sock");
        assert!(notify_to(Some(missing.as_os_str()), READY).is_err());
    }
}
