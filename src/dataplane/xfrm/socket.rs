//! The one place XFRM netlink I/O happens: a socket that sends many requests per
//! `sendmsg`, collects one ACK or error per request, and reads dumps.

use std::fmt;
use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_xfrm::XfrmMessage;
use netlink_sys::{protocols::NETLINK_XFRM, Socket, SocketAddr};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const HDR: usize = 16;
/// Bytes of requests per `sendmsg` (well under the default socket buffers).
const CHUNK_BYTES: usize = 64 * 1024;
/// Requests per `sendmsg`: each ACK the kernel queues costs about 1 KiB of the receive
/// buffer (skb truesize), and a default 208 KiB buffer overflows (ENOBUFS, ACKs lost) well
/// before 64 KiB of small requests.
const CHUNK_MSGS: usize = 96;
/// Receive buffer asked for (SO_RCVBUFFORCE as root, else capped by rmem_max).
const RCVBUF: libc::c_int = 8 * 1024 * 1024;
/// How long one receive waits for the kernel before the request fails (the kernel answers
/// XFRM requests while `sendmsg` runs, so this only fires when something is badly wrong).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request the kernel refused: errno and, when the kernel gave one, its extended-ACK
/// message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct KernelError {
    pub errno: i32,
    pub message: Option<String>,
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = io::Error::from_raw_os_error(self.errno);
        match &self.message {
            Some(m) => write!(f, "{m} ({os})"),
            None => write!(f, "{os}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("XFRM netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Kernel(#[from] KernelError),
    #[error("XFRM netlink: cannot parse the kernel's answer: {0}")]
    Decode(String),
    #[error("XFRM netlink: no answer from the kernel within {} for {what}", secs(*.waited))]
    Timeout { waited: Duration, what: String },
}

/// `10 s`, `0.2 s`.
fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

pub struct XfrmSocket {
    sock: Socket,
    seq: u32,
    timeout: Duration,
}

/// One netlink message of a received datagram, split without interpreting the payload.
struct Raw<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    bytes: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn split(buf: &[u8]) -> Result<Vec<Raw<'_>>, SocketError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + HDR <= buf.len() {
        let len = u32_at(buf, off) as usize;
        if len < HDR || off + len > buf.len() {
            return Err(SocketError::Decode(format!("bad message length {len}")));
        }
        out.push(Raw {
            kind: u16_at(buf, off + 4),
            flags: u16_at(buf, off + 6),
            seq: u32_at(buf, off + 8),
            bytes: &buf[off..off + len],
        });
        off += (len + 3) & !3;
    }
    Ok(out)
}

/// The errno and extended-ACK text of an `NLMSG_ERROR` (0 = ACK). One too short to hold
/// the errno is a protocol error (`EPROTO`), never an ACK.
fn parse_error(m: &Raw<'_>) -> (i32, Option<String>) {
    let b = m.bytes;
    if b.len() < HDR + 4 {
        return (
            libc::EPROTO,
            Some(format!(
                "truncated NLMSG_ERROR from the kernel ({} bytes, the errno needs {})",
                b.len(),
                HDR + 4
            )),
        );
    }
    let errno = -(u32_at(b, HDR) as i32);
    let mut message = None;
    if m.flags & NLM_F_ACK_TLVS != 0 {
        // With NETLINK_CAP_ACK the echoed request is its header only.
        let mut off = HDR + 4 + HDR;
        while off + 4 <= b.len() {
            let len = u16_at(b, off) as usize;
            let kind = u16_at(b, off + 2) & 0x3fff;
            if len < 4 || off + len > b.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let s = &b[off + 4..off + len];
                let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
                message = Some(String::from_utf8_lossy(&s[..end]).into_owned());
            }
            off += (len + 3) & !3;
        }
    }
    (errno, message)
}

fn force_rcvbuf(sock: &Socket) {
    use std::os::fd::AsRawFd;
    let size = RCVBUF;
    // SAFETY: setsockopt on our own socket with a pointer to a c_int of the right size.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = sock.set_rx_buf_sz(RCVBUF as usize);
    }
}

impl XfrmSocket {
    /// Open an XFRM netlink socket in the caller's network namespace.
    pub fn open() -> Result<XfrmSocket, SocketError> {
        let mut sock = Socket::new(NETLINK_XFRM)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        sock.set_cap_ack(true)?;
        sock.set_ext_ack(true)?;
        // Large dumps and batches of ACKs: ask for a big receive buffer.
        force_rcvbuf(&sock);
        XfrmSocket::with_socket(sock, DEFAULT_TIMEOUT)
    }

    /// Wrap a connected netlink socket; every receive waits at most `timeout`.
    fn with_socket(sock: Socket, timeout: Duration) -> Result<XfrmSocket, SocketError> {
        let mut s = XfrmSocket {
            sock,
            seq: 1,
            timeout,
        };
        s.set_timeout(timeout)?;
        Ok(s)
    }

    /// How long one receive waits for the kernel (SO_RCVTIMEO) before the call fails with
    /// [`SocketError::Timeout`].
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), SocketError> {
        use std::os::fd::AsRawFd;
        // A zero timeval would mean "wait forever".
        let timeout = timeout.max(Duration::from_millis(1));
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SAFETY: setsockopt on our own socket with a pointer to a timeval of the right size.
        let r = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error().into());
        }
        self.timeout = timeout;
        Ok(())
    }

    /// A receive error, with a timeout named as such.
    fn recv_error(&self, e: io::Error, what: impl FnOnce() -> String) -> SocketError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => SocketError::Timeout {
                waited: self.timeout,
                what: what(),
            },
            _ => SocketError::Io(e),
        }
    }

    fn frame(&mut self, msg: XfrmMessage, flags: u16) -> (u32, Vec<u8>) {
        self.seq = self.seq.wrapping_add(1).max(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        (self.seq, buf)
    }

    fn recv(&self, what: impl FnOnce() -> String) -> Result<Vec<u8>, SocketError> {
        match self.sock.recv_from_full() {
            Ok((data, _)) => Ok(data),
            Err(e) => Err(self.recv_error(e, what)),
        }
    }

    /// Dump (`NLM_F_DUMP`) and return every answer message.
    pub fn dump(&mut self, msg: XfrmMessage) -> Result<Vec<XfrmMessage>, SocketError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.dump_raw(
            msg,
            |bytes| match NetlinkMessage::<XfrmMessage>::deserialize(bytes) {
                Ok(nl) => {
                    if let NetlinkPayload::InnerMessage(x) = nl.payload {
                        out.push(x);
                    }
                }
                Err(e) => bad = Some(e.to_string()),
            },
        )?;
        match bad {
            Some(e) => Err(SocketError::Decode(e)),
            None => Ok(out),
        }
    }

    /// Dump and hand every answer message (whole, header included) to `each`, without
    /// decoding: for hot paths that parse only what they need.
    pub fn dump_raw(
        &mut self,
        msg: XfrmMessage,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), SocketError> {
        let (seq, buf) = self.frame(msg, NLM_F_DUMP);
        self.sock.send(&buf, 0)?;
        let mut data = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = match self.sock.recv(&mut &mut data[..], 0) {
                Ok(n) => n,
                Err(e) => {
                    return Err(self.recv_error(e, || {
                        format!("a dump ({got} messages received, no end-of-dump)")
                    }))
                }
            };
            for m in split(&data[..n])? {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let (errno, message) = parse_error(&m);
                        if errno != 0 {
                            return Err(KernelError { errno, message }.into());
                        }
                    }
                    _ => {
                        got += 1;
                        each(m.bytes)
                    }
                }
            }
        }
    }

    /// A request answered by one message (e.g. `GETSPDINFO`).
    pub fn query(&mut self, msg: XfrmMessage) -> Result<XfrmMessage, SocketError> {
        let (seq, buf) = self.frame(msg, 0);
        self.sock.send(&buf, 0)?;
        loop {
            let data = self.recv(|| "a query".to_string())?;
            for m in split(&data)? {
                if m.seq != seq {
                    continue;
                }
                if m.kind == NLMSG_ERROR {
                    let (errno, message) = parse_error(&m);
                    return Err(KernelError {
                        errno: if errno == 0 { libc::EPROTO } else { errno },
                        message,
                    }
                    .into());
                }
                let nl = NetlinkMessage::<XfrmMessage>::deserialize(m.bytes)
                    .map_err(|e| SocketError::Decode(e.to_string()))?;
                if let NetlinkPayload::InnerMessage(x) = nl.payload {
                    return Ok(x);
                }
            }
        }
    }

    /// Send every request (with `NLM_F_ACK` and its own extra flags), many per `sendmsg`,
    /// and return one result per request, in order. A refused request does not stop the
    /// others: the kernel processes each message of a batch independently.
    pub fn batch(
        &mut self,
        reqs: Vec<(XfrmMessage, u16)>,
    ) -> Result<Vec<Result<(), KernelError>>, SocketError> {
        let n = reqs.len();
        let mut results: Vec<Option<Result<(), KernelError>>> = vec![None; n];
        let mut reqs = reqs.into_iter().enumerate().peekable();
        while reqs.peek().is_some() {
            let mut chunk = Vec::with_capacity(CHUNK_BYTES);
            let mut pending = std::collections::HashMap::new();
            let mut count = 0;
            while let Some((i, (msg, flags))) =
                reqs.next_if(|_| chunk.len() < CHUNK_BYTES && count < CHUNK_MSGS)
            {
                count += 1;
                let (seq, bytes) = self.frame(msg, NLM_F_ACK | flags);
                chunk.extend_from_slice(&bytes);
                pending.insert(seq, i);
            }
            self.sock.send(&chunk, 0)?;
            while !pending.is_empty() {
                let left = pending.len();
                let data = self.recv(|| format!("{left} of {count} requests"))?;
                for m in split(&data)? {
                    if m.kind != NLMSG_ERROR {
                        continue;
                    }
                    if let Some(i) = pending.remove(&m.seq) {
                        let (errno, message) = parse_error(&m);
                        results[i] = Some(if errno == 0 {
                            Ok(())
                        } else {
                            Err(KernelError { errno, message })
                        });
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request was answered"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_error_with_ext_ack() {
        let mut b = Vec::new();
        let body_len = HDR + 4 + HDR + 4 + 24;
        b.extend_from_slice(&(body_len as u32).to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&NLM_F_ACK_TLVS.to_ne_bytes());
        b.extend_from_slice(&7u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&(-93i32).to_ne_bytes());
        b.extend_from_slice(&[0u8; HDR]);
        let msg = b"Requested type not found";
        b.extend_from_slice(&((4 + msg.len() + 1) as u16).to_ne_bytes());
        b.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        b.extend_from_slice(msg);
        b.push(0);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        let len = b.len() as u32;
        b[..4].copy_from_slice(&len.to_ne_bytes());
        let msgs = split(&b).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].seq, 7);
        let (errno, text) = parse_error(&msgs[0]);
        assert_eq!(errno, 93);
        assert_eq!(text.as_deref(), Some("Requested type not found"));
        let e = KernelError {
            errno,
            message: text,
        };
        assert!(e
            .to_string()
            .starts_with("Requested type not found (Protocol not supported"));
    }

    /// A 16-byte `NLMSG_ERROR`: a header and no errno.
    fn truncated_error(seq: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(HDR as u32).to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b
    }

    #[test]
    fn truncated_error_is_not_an_ack() {
        let b = truncated_error(9);
        let msgs = split(&b).unwrap();
        assert_eq!(msgs.len(), 1);
        let (errno, text) = parse_error(&msgs[0]);
        assert_eq!(errno, libc::EPROTO);
        assert!(
            text.as_deref().unwrap().contains("truncated NLMSG_ERROR"),
            "{text:?}"
        );
    }

    /// A stand-in for the kernel: a `NETLINK_USERSOCK` socket that our socket is connected
    /// to. It reads one datagram and answers with what `reply` makes of each request's
    /// sequence number (nothing at all when `reply` returns empty bytes).
    fn fake_kernel(
        reply: impl Fn(u32) -> Vec<u8> + Send + 'static,
    ) -> (XfrmSocket, std::thread::JoinHandle<usize>) {
        const NETLINK_USERSOCK: isize = 2;
        let mut kernel = Socket::new(NETLINK_USERSOCK).unwrap();
        let kaddr = kernel.bind_auto().unwrap();
        let mut ours = Socket::new(NETLINK_USERSOCK).unwrap();
        let us = ours.bind_auto().unwrap();
        ours.connect(&kaddr).unwrap();
        let h = std::thread::spawn(move || {
            let (data, _) = kernel.recv_from_full().unwrap();
            let reqs = split(&data).unwrap();
            let mut out = Vec::new();
            for m in &reqs {
                out.extend(reply(m.seq));
            }
            if !out.is_empty() {
                kernel.send_to(&out, &us, 0).unwrap();
            }
            reqs.len()
        });
        let sock = XfrmSocket::with_socket(ours, Duration::from_millis(200)).unwrap();
        (sock, h)
    }

    fn spd_get() -> (XfrmMessage, u16) {
        (super::super::messages::spdinfo_get(), 0)
    }

    /// Run `f` on a thread; fail (instead of hanging) when it does not return within 5 s.
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the call did not return within 5 s (no receive timeout?)")
    }

    #[test]
    fn truncated_error_fails_the_request_in_a_batch() {
        let (mut sock, kernel) = fake_kernel(truncated_error);
        let r = within_5s(move || sock.batch(vec![spd_get(), spd_get()]));
        assert_eq!(kernel.join().unwrap(), 2);
        let r = r.unwrap();
        assert_eq!(r.len(), 2);
        for one in r {
            let e = one.unwrap_err();
            assert_eq!(e.errno, libc::EPROTO);
            assert!(e.to_string().contains("truncated NLMSG_ERROR"), "{e}");
        }
    }

    #[test]
    fn missing_acks_time_out_with_a_clear_error() {
        let (mut sock, kernel) = fake_kernel(|_| Vec::new());
        let t = std::time::Instant::now();
        let r = within_5s(move || sock.batch(vec![spd_get(), spd_get(), spd_get()]));
        assert_eq!(kernel.join().unwrap(), 3, "the requests reached the peer");
        let e = r.unwrap_err();
        assert!(matches!(e, SocketError::Timeout { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "XFRM netlink: no answer from the kernel within 0.2 s for 3 of 3 requests"
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn silent_dump_and_query_time_out() {
        let (mut sock, kernel) = fake_kernel(|_| Vec::new());
        let e = within_5s(move || sock.dump_raw(super::super::messages::sa_dump(), |_| {}))
            .unwrap_err();
        kernel.join().unwrap();
        assert_eq!(
            e.to_string(),
            "XFRM netlink: no answer from the kernel within 0.2 s for a dump (0 messages received, no end-of-dump)"
        );
        let (mut sock, kernel) = fake_kernel(|_| Vec::new());
        let e = within_5s(move || sock.query(super::super::messages::spdinfo_get())).unwrap_err();
        kernel.join().unwrap();
        assert!(e.to_string().ends_with("within 0.2 s for a query"), "{e}");
    }

    #[test]
    fn rejects_truncated_messages() {
        let mut b = vec![0u8; 20];
        b[..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(split(&b).is_err());
    }
}
