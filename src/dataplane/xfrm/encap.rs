//! The UDP socket ESP-in-UDP (RFC 3948) needs: the kernel decapsulates ESP that arrives on
//! UDP only on a socket marked `UDP_ENCAP_ESPINUDP`, for as long as that socket is open.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use netlink_packet_xfrm::constants::UDP_ENCAP_ESPINUDP;

/// Binds UDP `port` on every address of the endpoint's family and marks the socket for
/// ESP-in-UDP decapsulation.
pub fn open_socket(v6: bool, port: u16) -> std::io::Result<UdpSocket> {
    let addr: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, port).into()
    };
    let sock = UdpSocket::bind(addr)?;
    let kind = libc::c_int::from(UDP_ENCAP_ESPINUDP);
    // SAFETY: setsockopt on a socket we own, with a pointer to a c_int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_ENCAP,
            &kind as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket's encapsulation type as the kernel reports it.
    fn encap_type(sock: &UdpSocket) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt on a socket we own, into a c_int with its size in `len`.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_ENCAP,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        v
    }

    #[test]
    fn the_socket_is_marked_for_esp_in_udp() {
        // port 0: any free port, no root needed
        let s = open_socket(false, 0).unwrap();
        assert!(s.local_addr().unwrap().is_ipv4());
        assert_eq!(encap_type(&s), libc::c_int::from(UDP_ENCAP_ESPINUDP));
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(encap_type(&plain), 0);
    }
}
