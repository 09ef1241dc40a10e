//! charon's failures put into words an operator can act on: the `errmsg` of a failed
//! `initiate` and the `control-log` lines charon sent while it ran. Pure.

use super::wire::{Message, Value};

/// charon's answer to a failed `initiate` (its `errmsg` and the `control-log` lines sent
/// while it ran) put into words an operator can act on. The first matching cause wins;
/// charon's own message is kept at the end.
pub fn explain(errmsg: &str, log: &[String]) -> String {
    explain_with(errmsg, log, false)
}

const NO_ESP: &str = "charon could not install the CHILD_SA: the kernel cannot hold ESP SAs (no CONFIG_INET_ESP/xfrm ESP support; use charon-conf/strongswan-libipsec.conf, i.e. kernel-libipsec)";

/// [`explain`], knowing whether this host's charon installs SAs in a kernel that cannot
/// hold ESP (`kernel-netlink` without ESP, see [`super::esp`]). Then a CHILD_SA failure
/// is put down to the kernel even when the peer's refusal (`NO_PROPOSAL_CHOSEN`: its kernel
/// failed first) is all charon saw.
pub fn explain_with(errmsg: &str, log: &[String], no_kernel_esp: bool) -> String {
    let has = |needle: &str| log.iter().any(|l| l.contains(needle)) || errmsg.contains(needle);
    let auth = has("received AUTHENTICATION_FAILED notify");
    let unreachable = has("giving up after") || has("peer not responding");
    let cause = if has("unable to add SAD entry")
        || has("Protocol not supported (93)")
        || has("unable to install inbound and outbound IPsec SA")
    {
        Some(NO_ESP.to_string())
    } else if no_kernel_esp && !auth && !unreachable && has("CHILD_SA") {
        Some(format!(
            "{NO_ESP}; the peer refused the CHILD_SA too (its kernel failed first, or its proposals differ)"
        ))
    } else if auth {
        Some("the peer rejected our authentication: the PSKs of the two hosts differ (or the peer does not know our identity)".into())
    } else if has("MAC mismatched") || has("verification failed") {
        Some("the peer's authentication did not verify: the PSKs of the two hosts differ".into())
    } else if has("no shared key found") {
        Some("no PSK for this pair is loaded in charon".into())
    } else if has("received NO_PROPOSAL_CHOSEN notify") {
        Some("the peer refused the proposals: it has no matching IKE/ESP proposal, no conn for this host yet (is ipsec-mesh running there?), or could not install the CHILD_SA itself (see its charon log)".into())
    } else if has("received TS_UNACCEPTABLE notify") {
        Some("the peer refused the traffic selectors: the two hosts disagree on the subnets (or, with kernel-libipsec, the peer has no address inside its own subnet)".into())
    } else if has("unable to install IPsec policies") || has("unable to install policy") {
        Some("charon could not install the IPsec policies or routes for the CHILD_SA (with kernel-libipsec this host needs an address inside its own subnet)".into())
    } else if unreachable || has("timed out") || has("not established after") {
        Some("the peer does not answer IKE (UDP 500/4500 blocked, host down, or charon not running there)".into())
    } else if has("CHILD_SA config") && has("not found") {
        Some("charon has no such child config (the conn was not loaded)".into())
    } else {
        None
    };
    match cause {
        Some(c) => format!("{c} (charon: {errmsg})"),
        None => format!("charon: {errmsg}"),
    }
}

/// The `msg` of a `control-log` event message.
pub fn control_log_line(m: &Message) -> Option<String> {
    match m.get("msg") {
        Some(Value::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::charon::test_fixtures::fixture_packets;

    #[test]
    fn failures_in_words() {
        let no_esp = explain(
            "establishing CHILD_SA 'ipsec-mesh-host-b' failed",
            &[
                "received netlink error: Protocol not supported (93)".into(),
                "unable to add SAD entry with SPI c5f7a0b1 (FAILED)".into(),
            ],
        );
        assert!(
            no_esp.starts_with(
                "charon could not install the CHILD_SA: the kernel cannot hold ESP SAs"
            ),
            "{no_esp}"
        );
        assert!(no_esp.contains("kernel-libipsec"));
        assert!(no_esp.ends_with("(charon: establishing CHILD_SA 'ipsec-mesh-host-b' failed)"));
        let psk = explain(
            "establishing CHILD_SA 'x' failed",
            &["received AUTHENTICATION_FAILED notify error".into()],
        );
        assert!(psk.contains("PSKs of the two hosts differ"), "{psk}");
        assert_eq!(explain("weird", &[]), "charon: weird");
        // both ends without ESP: the peer fails first and answers NO_PROPOSAL_CHOSEN
        let log = ["received NO_PROPOSAL_CHOSEN notify error".to_string()];
        let msg = "establishing CHILD_SA 'ipsec-mesh-host-b' failed";
        assert!(explain(msg, &log).starts_with("the peer refused the proposals"));
        assert!(explain_with(msg, &log, true).starts_with(NO_ESP));
        // ...but a PSK mismatch stays a PSK mismatch
        let auth = ["received AUTHENTICATION_FAILED notify error".to_string()];
        assert!(explain_with(msg, &auth, true).contains("PSKs"));
    }
    // --- against real charon output (vici-fixtures/, charon-systemd 5.9.8)

    #[test]
    fn no_kernel_esp_fixture_is_explained() {
        use crate::dataplane::charon::wire::Packet;
        let packets = fixture_packets("21-error-initiate-no-kernel-esp");
        let log: Vec<String> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::Event { name, message } if name == "control-log" => {
                    control_log_line(message)
                }
                _ => None,
            })
            .collect();
        let errmsg = packets
            .iter()
            .find_map(|p| match p {
                Packet::CmdResponse(m) => m.str("errmsg").map(str::to_string),
                _ => None,
            })
            .unwrap();
        assert_eq!(errmsg, "establishing CHILD_SA 'ipsec-mesh-host-b' failed");
        let e = explain(&errmsg, &log);
        assert!(
            e.starts_with("charon could not install the CHILD_SA: the kernel cannot hold ESP SAs"),
            "{e}"
        );
        // without the log lines charon's words are all there is
        assert_eq!(explain(&errmsg, &[]), format!("charon: {errmsg}"));
    }
}
