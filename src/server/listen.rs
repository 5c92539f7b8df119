//! Listening sockets: the data plane's `SO_REUSEPORT` group (one socket per
//! worker), refused when another process holds the address unless this is
//! a takeover; the admin listener; and the process's file-descriptor limit
//! that bounds how many connections it can hold.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Raises the soft limit on open files to the hard limit (as nginx's
/// `worker_rlimit_nofile` would), and returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        if let (Some(current), Some(hard)) = (limit.current, limit.maximum)
            && current < hard
        {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return hard;
            }
        }
        limit.current.unwrap_or(1 << 20)
    }
    #[cfg(not(target_os = "linux"))]
    1024
}

/// File descriptors kept back from client connections: the store, the
/// admin API, logs, the runtime's own.
const RESERVED_FDS: u64 = 128;

/// `limits.max_connections` when unset: half of what the descriptor limit
/// leaves after a reserve, since each client connection may hold an
/// upstream connection too.
pub fn default_max_connections(fd_limit: u64) -> usize {
    let usable = fd_limit.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(usable.max(16)).unwrap_or(usize::MAX)
}

/// `n` sockets on one address with `SO_REUSEPORT`, so the kernel spreads
/// connections across workers. Port 0 is resolved by the first bind.
///
/// `SO_REUSEPORT` would also let this process join sockets another process
/// (another keygate, with other keys) already listens on, and silently
/// take part of its traffic: unless `takeover` says that is the intent,
/// an address in use is an error.
pub fn data_sockets(
    addr: SocketAddr,
    n: usize,
    takeover: bool,
) -> Result<Vec<std::net::TcpListener>, String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = |addr: SocketAddr| {
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| format!("cannot create socket: {e}"))
    };
    if addr.port() != 0 && !takeover {
        // A plain bind, without SO_REUSEPORT, fails while any socket
        // listens on the address, keygate's or not.
        let probe = socket(addr)?;
        probe
            .set_reuse_address(true)
            .map_err(|e| format!("cannot configure socket: {e}"))?;
        match probe.bind(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(format!(
                    "cannot listen on {addr}: the address is in use by another process; to replace a running keygate without downtime, start the new one with `serve --takeover`"
                ));
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n.max(1) {
        let socket = socket(bound)?;
        socket
            .set_reuse_address(true)
            .and_then(|()| socket.set_reuse_port(true))
            .and_then(|()| socket.set_tcp_nodelay(true))
            .and_then(|()| socket.set_nonblocking(true))
            .map_err(|e| format!("cannot configure socket: {e}"))?;
        socket
            .bind(&bound.into())
            .and_then(|()| socket.listen(1024))
            .map_err(|e| match (takeover, e.kind()) {
                (true, std::io::ErrorKind::AddrInUse) => format!(
                    "cannot join the listeners on {addr}: they belong to a process of another user, or one that did not open them with SO_REUSEPORT"
                ),
                _ => format!("cannot listen on {addr}: {e}"),
            })?;
        let listener: std::net::TcpListener = socket.into();
        if out.is_empty() {
            bound = listener.local_addr().map_err(|e| e.to_string())?;
        }
        out.push(listener);
    }
    Ok(out)
}

/// The admin listener. During a takeover the previous instance holds the
/// address until it starts to drain: it is tried again until `wait` has
/// passed.
pub async fn admin(addr: SocketAddr, wait: Option<Duration>) -> Result<TcpListener, String> {
    control("admin", addr, wait).await
}

/// A control-plane listener (`what`: admin, egress); after a takeover the
/// previous instance may hold the address until it lets go, so it is tried
/// again until `wait` has passed.
pub async fn control(
    what: &str,
    addr: SocketAddr,
    wait: Option<Duration>,
) -> Result<TcpListener, String> {
    let until = tokio::time::Instant::now() + wait.unwrap_or_default();
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e)
                if wait.is_some()
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(format!("cannot listen on {what} address {addr}: {e}")),
        }
    }
}

/// The next connection, or `None` once shutdown has begun. Accept errors
/// (out of file descriptors and the like) back off briefly and retry.
pub async fn accept(
    listener: &TcpListener,
    stopped: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, local = ?listener.local_addr().ok(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped.changed() => return None,
        }
    }
}

/// A connection already waiting in the backlog, if there is one.
pub fn accept_ready(listener: &TcpListener) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match listener.poll_accept(&mut cx) {
        std::task::Poll::Ready(Ok(accepted)) => Some(accepted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_default_leaves_room_for_upstreams() {
        assert_eq!(default_max_connections(1024), 448);
        assert_eq!(default_max_connections(100), 16);
        assert_eq!(default_max_connections(1 << 20), ((1 << 20) - 128) / 2);
    }

    #[test]
    fn a_held_address_is_refused_unless_taken_over() {
        let first = data_sockets("127.0.0.1:0".parse().unwrap(), 2, false).unwrap();
        let addr = first[0].local_addr().unwrap();
        let e = data_sockets(addr, 2, false).unwrap_err();
        assert!(e.contains("in use") && e.contains("--takeover"), "{e}");
        // Joining on purpose works: both are SO_REUSEPORT sockets of this
        // process's user.
        let joined = data_sockets(addr, 1, true).unwrap();
        assert_eq!(joined[0].local_addr().unwrap(), addr);
        // A plain listener elsewhere is refused too.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = data_sockets(plain.local_addr().unwrap(), 1, false).unwrap_err();
        assert!(e.contains("in use"), "{e}");
    }
}
