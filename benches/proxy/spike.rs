//! Issue [12]'s spike: the same minimal HTTP/1.1 data plane twice, to
//! measure what io_uring itself buys on this machine, apart from the rest
//! of keygate. Each is one thread per core on its own `SO_REUSEPORT`
//! listener; per request it reads the client's request (head and
//! `Content-Length` body), checks `Authorization: Bearer` by SHA-256
//! against the one valid key, forwards the request with `X-User-Id` added
//! on the connection's own upstream connection, reads the answer
//! (`Content-Length`) and writes it back; 401 for a wrong key.
//!
//! - [`epoll`]: tokio, a current-thread runtime per thread (keygate's model).
//! - [`uring`]: the `io-uring` crate under a loop of its own per thread:
//!   multishot accept, one submission per socket call, every queued
//!   submission sent with one `io_uring_enter` per loop turn (batched
//!   across connections); with `linked`, each send is linked to the
//!   receive that follows it (`IOSQE_IO_LINK`, `MSG_WAITALL`), so a request
//!   costs two completions instead of four.
//!
//! Neither parses or checks what keygate does (no routes, owners, limits,
//! hop-by-hop rules, smuggling defences, metrics or logs), so the pair
//! bounds io_uring's gain on the socket work, which is what keygate shares
//! with it.

use sha2::{Digest, Sha256};
use std::net::{SocketAddr, TcpListener, TcpStream};

const BUF: usize = 16 * 1024;

/// The listener for one worker thread.
fn reuseport_listener(port: u16) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_tcp_nodelay(true).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    socket.bind(&addr.into()).unwrap();
    socket.listen(4096).unwrap();
    socket.into()
}

/// Where a complete message ends in `buf`: its head's end plus its
/// `Content-Length`; `None` while incomplete.
fn complete(buf: &[u8]) -> Option<usize> {
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut length = 0usize;
    for line in buf[..head].split(|b| *b == b'\n') {
        if line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            length = std::str::from_utf8(&line[15..]).ok()?.trim().parse().ok()?;
        }
    }
    (buf.len() >= head + length).then_some(head + length)
}

/// Whether the request's bearer key hashes to `valid`.
fn authorized(request: &[u8], valid: &[u8; 32]) -> bool {
    let head_end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(request.len());
    for line in request[..head_end].split(|b| *b == b'\n') {
        if line.len() > 14 && line[..14].eq_ignore_ascii_case(b"authorization:") {
            let value = std::str::from_utf8(&line[14..]).unwrap_or("").trim();
            let Some(key) = value.strip_prefix("Bearer ") else {
                return false;
            };
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            return subtle::ConstantTimeEq::ct_eq(&digest[..], &valid[..]).into();
        }
    }
    false
}

/// The request as it goes upstream: `X-User-Id` after the request line.
fn upstream_request(request: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let line_end = request
        .iter()
        .position(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    out.extend_from_slice(&request[..line_end]);
    out.extend_from_slice(b"X-User-Id: bench_user\r\n");
    out.extend_from_slice(&request[line_end..]);
}

const UNAUTHORIZED: &[u8] =
    b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"error\":\"Invalid API key\"}\r\n";

pub mod epoll {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub fn serve(port: u16, upstream: u16, valid: [u8; 32], threads: usize) {
        for _ in 0..threads {
            let listener = reuseport_listener(port);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    listener.set_nonblocking(true).unwrap();
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        tokio::spawn(connection(client, upstream, valid));
                    }
                });
            });
        }
    }

    async fn connection(mut client: tokio::net::TcpStream, upstream: u16, valid: [u8; 32]) {
        let _ = client.set_nodelay(true);
        let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
            return;
        };
        let _ = up.set_nodelay(true);
        let (mut request, mut answer, mut out) = (
            Vec::with_capacity(BUF),
            Vec::with_capacity(BUF),
            Vec::with_capacity(BUF),
        );
        let mut chunk = vec![0u8; BUF];
        loop {
            request.clear();
            let end = loop {
                if let Some(end) = complete(&request) {
                    break end;
                }
                match client.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            };
            if !authorized(&request[..end], &valid) {
                if client.write_all(UNAUTHORIZED).await.is_err() {
                    return;
                }
                continue;
            }
            upstream_request(&request[..end], &mut out);
            if up.write_all(&out).await.is_err() {
                return;
            }
            answer.clear();
            let end = loop {
                if let Some(end) = complete(&answer) {
                    break end;
                }
                match up.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => answer.extend_from_slice(&chunk[..n]),
                }
            };
            if client.write_all(&answer[..end]).await.is_err() {
                return;
            }
        }
    }
}

/// The `io-uring` loop. The kernel reads and writes the buffers a
/// submission names until its completion arrives, so each connection's
/// buffers live in a slab entry that is not moved or dropped while an
/// operation on it is in flight (a connection closes only once its one
/// operation has completed).
#[allow(unsafe_code)]
pub mod uring {
    use super::*;
    use io_uring::{IoUring, opcode, squeue, types};
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

    const ACCEPT: u64 = u64::MAX;
    /// Marks a linked send's completion.
    const SENT: u64 = 1 << 62;
    const MSG_WAITALL: i32 = 0x100;

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Step {
        ReadRequest,
        WriteUpstream,
        ReadAnswer,
        WriteClient,
    }

    struct Conn {
        client: RawFd,
        up: RawFd,
        step: Step,
        /// What is being read (request or answer), or written.
        buf: Vec<u8>,
        out: Vec<u8>,
        /// Bytes of `out` already written.
        sent: usize,
    }

    /// False (and nothing started) where the kernel or a seccomp profile
    /// (Docker's default) refuses `io_uring_setup`.
    pub fn serve(port: u16, upstream: u16, valid: [u8; 32], threads: usize, linked: bool) -> bool {
        if IoUring::new(8).is_err() {
            return false;
        }
        for _ in 0..threads {
            let listener = reuseport_listener(port);
            std::thread::spawn(move || run(listener, upstream, valid, linked));
        }
        true
    }

    fn push(ring: &mut IoUring, entry: &squeue::Entry) {
        // SAFETY: every buffer an entry names belongs to a slab entry that
        // stays in place until the entry's completion (see the module doc).
        while unsafe { ring.submission().push(entry) }.is_err() {
            ring.submit().unwrap();
        }
    }

    fn read(ring: &mut IoUring, index: usize, conn: &mut Conn) {
        let fd = match conn.step {
            Step::ReadRequest => conn.client,
            _ => conn.up,
        };
        let len = conn.buf.len();
        if conn.buf.capacity() - len < BUF / 2 {
            conn.buf.reserve(BUF);
        }
        let spare = conn.buf.capacity() - len;
        // SAFETY: the spare capacity stays allocated until the completion
        // (nothing touches `buf` meanwhile).
        let ptr = unsafe { conn.buf.as_mut_ptr().add(len) };
        let entry = opcode::Recv::new(types::Fd(fd), ptr, spare as u32)
            .build()
            .user_data(index as u64);
        push(ring, &entry);
    }

    fn write(ring: &mut IoUring, index: usize, conn: &mut Conn, linked: bool) {
        let fd = match conn.step {
            Step::WriteUpstream => conn.up,
            _ => conn.client,
        };
        let rest = &conn.out[conn.sent..];
        let send = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32);
        if !linked {
            push(ring, &send.build().user_data(index as u64));
            return;
        }
        // The receive that follows starts once the whole send is done; a
        // failed send cancels it, and its completion closes the connection.
        let entry = send
            .flags(MSG_WAITALL)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(index as u64 | SENT);
        push(ring, &entry);
        conn.step = match conn.step {
            Step::WriteUpstream => Step::ReadAnswer,
            _ => Step::ReadRequest,
        };
        if conn.step == Step::ReadAnswer {
            conn.buf.clear();
        }
        read(ring, index, conn);
    }

    fn run(listener: TcpListener, upstream: u16, valid: [u8; 32], linked: bool) {
        let mut ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(4096)
            .unwrap();
        let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .build()
            .user_data(ACCEPT);
        push(&mut ring, &accept);
        let mut slab: Vec<Option<Conn>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut done = Vec::with_capacity(256);
        loop {
            ring.submit_and_wait(1).unwrap();
            done.clear();
            done.extend(
                ring.completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(data, result, flags) in &done {
                if data == ACCEPT {
                    if !io_uring::cqueue::more(flags) {
                        push(&mut ring, &accept);
                    }
                    if result < 0 {
                        continue;
                    }
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        // SAFETY: the fd was just accepted and is ours.
                        drop(unsafe { TcpStream::from_raw_fd(result) });
                        continue;
                    };
                    let _ = up.set_nodelay(true);
                    // SAFETY: as above.
                    let client = unsafe { TcpStream::from_raw_fd(result) };
                    let _ = client.set_nodelay(true);
                    let conn = Conn {
                        client: client.into_raw_fd(),
                        up: up.into_raw_fd(),
                        step: Step::ReadRequest,
                        buf: Vec::with_capacity(BUF),
                        out: Vec::with_capacity(BUF),
                        sent: 0,
                    };
                    let index = match free.pop() {
                        Some(i) => {
                            slab[i] = Some(conn);
                            i
                        }
                        None => {
                            slab.push(Some(conn));
                            slab.len() - 1
                        }
                    };
                    let conn = slab[index].as_mut().unwrap();
                    read(&mut ring, index, conn);
                    continue;
                }
                if data & SENT != 0 {
                    continue;
                }
                let index = data as usize;
                let Some(conn) = slab[index].as_mut() else {
                    continue;
                };
                if result <= 0 {
                    // SAFETY: both fds are this connection's, and no
                    // operation on them is in flight.
                    unsafe {
                        drop(TcpStream::from_raw_fd(conn.client));
                        drop(TcpStream::from_raw_fd(conn.up));
                    }
                    slab[index] = None;
                    free.push(index);
                    continue;
                }
                let n = result as usize;
                match conn.step {
                    Step::ReadRequest | Step::ReadAnswer => {
                        // SAFETY: the kernel wrote `n` bytes past `len`.
                        unsafe { conn.buf.set_len(conn.buf.len() + n) };
                        let Some(end) = complete(&conn.buf) else {
                            read(&mut ring, index, conn);
                            continue;
                        };
                        conn.sent = 0;
                        if conn.step == Step::ReadRequest {
                            if authorized(&conn.buf[..end], &valid) {
                                upstream_request(&conn.buf[..end], &mut conn.out);
                                conn.step = Step::WriteUpstream;
                            } else {
                                conn.out.clear();
                                conn.out.extend_from_slice(UNAUTHORIZED);
                                conn.step = Step::WriteClient;
                            }
                        } else {
                            conn.out.clear();
                            conn.out.extend_from_slice(&conn.buf[..end]);
                            conn.step = Step::WriteClient;
                        }
                        conn.buf.drain(..end);
                        write(&mut ring, index, conn, linked);
                    }
                    Step::WriteUpstream | Step::WriteClient => {
                        conn.sent += n;
                        if conn.sent < conn.out.len() {
                            write(&mut ring, index, conn, linked);
                            continue;
                        }
                        conn.step = match conn.step {
                            Step::WriteUpstream => Step::ReadAnswer,
                            _ => Step::ReadRequest,
                        };
                        if conn.step == Step::ReadAnswer {
                            conn.buf.clear();
                        }
                        read(&mut ring, index, conn);
                    }
                }
            }
        }
    }
}
