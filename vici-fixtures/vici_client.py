#!/usr/bin/env python3
"""Scenario client for the fixture capture (see capture.sh).

usage: vici_client.py SCENARIO SOCKET [DIRECT_SOCKET]

SOCKET is where the recorded session goes (the proxy); DIRECT_SOCKET is the same
charon's real socket, used for side actions that must not be recorded (e.g. another
client initiating while the recorded one monitors events). Also:
  vici_client.py setup SOCKET SELF PEER SELF_ADDR PEER_ADDR SELF_TS PEER_TS
loads the shared key and the conn for one side (not recorded).

Requests mirror what the ipsec-mesh charon driver sends (issue 4), key for key and in
the same order as the Rust encoder (src/dataplane/charon/types.rs), so
tests/charon_fixtures.rs can compare the recorded requests byte for byte: shared key with
an id and owners, one conn `ipsec-mesh-<peer>` per peer with one child of the same
name (child names must be unique across conns: `initiate child=` picks the first
conn that has a child of that name)."""
import select
import socket
import struct
import sys
import time

from vici_wire import (CMD_REQUEST, CMD_RESPONSE, CMD_UNKNOWN, EVENT, EVENT_CONFIRM,
                       EVENT_REGISTER, EVENT_UNKNOWN, EVENT_UNREGISTER, TYPES,
                       decode_packet, encode_packet)

# throwaway value, only ever used between the capture's own network namespaces
PSK = "fixture-psk-not-secret-0123456789"
A = dict(id="host-a", addr="192.168.77.1", ts="10.42.1.0/24")
B = dict(id="host-b", addr="192.168.77.2", ts="10.42.2.0/24")


def conn(me, peer, rekey=True, proposals=("aes256gcm16-prfsha256-ecp256",)):
    name = f"ipsec-mesh-{peer['id']}"
    return {name: {
        "version": "2",
        "local_addrs": [me["addr"]],
        "remote_addrs": [peer["addr"]],
        "proposals": list(proposals),
        "encap": "no",
        "mobike": "no",
        "unique": "replace",
        "dpd_delay": "30",
        # only one side of a pair rekeys (no duplicate SAs): here the lower id
        "rekey_time": "14400" if rekey else "0",
        "local": {"auth": "psk", "id": me["id"]},
        "remote": {"auth": "psk", "id": peer["id"]},
        "children": {name: {
            "local_ts": [me["ts"]],
            "remote_ts": [peer["ts"]],
            "mode": "tunnel",
            "esp_proposals": ["aes256gcm16"],
            "rekey_time": "3600" if rekey else "0",
            "start_action": "none",
            "dpd_action": "restart",
            "close_action": "none",
        }},
    }}


def shared(me, peer):
    return {"type": "IKE", "data": PSK, "id": "ipsec-mesh-psk", "owners": [me["id"], peer["id"]]}


class Session:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.buf = b""

    def close(self):
        self.s.close()

    def send(self, ptype, name=None, msg=None):
        self.s.sendall(encode_packet(ptype, name, msg))

    def recv(self, timeout=15.0):
        """one packet -> (type, name, msg), or None on timeout"""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    p, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return decode_packet(p)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.s], [], [], left)
            if r:
                d = self.s.recv(65536)
                if not d:
                    raise EOFError("charon closed the connection")
                self.buf += d

    def until(self, kinds):
        events = []
        while True:
            p = self.recv()
            if p is None:
                raise TimeoutError(f"no {kinds} within timeout")
            if p[0] == EVENT:
                events.append(p)
                log(f"  <- EVENT {p[1]}")
                continue
            log(f"  <- {TYPES[p[0]]}" + (f" {p[2]}" if p[0] == CMD_RESPONSE and p[2].get(
                "success") == b"no" else ""))
            if p[0] in kinds:
                return p, events
            raise RuntimeError(f"unexpected {TYPES[p[0]]}")

    def cmd(self, name, msg=None):
        log(f"-> {name}")
        self.send(CMD_REQUEST, name, msg)
        return self.until({CMD_RESPONSE, CMD_UNKNOWN})

    def register(self, ev):
        log(f"-> register {ev}")
        self.send(EVENT_REGISTER, ev)
        return self.until({EVENT_CONFIRM, EVENT_UNKNOWN})

    def unregister(self, ev):
        log(f"-> unregister {ev}")
        self.send(EVENT_UNREGISTER, ev)
        return self.until({EVENT_CONFIRM, EVENT_UNKNOWN})

    def drain(self, secs):
        end = time.monotonic() + secs
        while (left := end - time.monotonic()) > 0:
            p = self.recv(left)
            if p is None:
                break
            log(f"  <- {TYPES[p[0]]} {p[1] or ''}")


def log(m):
    print(m, file=sys.stderr)


def must(resp, ok=True):
    (t, _, msg), _ = resp
    good = t == CMD_RESPONSE and msg.get("success", b"yes") == b"yes"
    if good != ok:
        raise SystemExit(f"unexpected outcome: {TYPES[t]} {msg}")
    return msg


def direct(path, name, msg):
    d = Session(path)
    try:
        return d.cmd(name, msg)
    finally:
        d.close()


NAME = "ipsec-mesh-host-b"


def scenario(sc, s, direct_path):
    if sc == "version":
        must(s.cmd("version"))
    elif sc == "stats":
        must(s.cmd("stats"))
    elif sc == "get-shared":
        must(s.cmd("get-shared"))
    elif sc == "load-shared":
        must(s.cmd("load-shared", shared(A, B)))
    elif sc == "load-conn":
        must(s.cmd("load-conn", conn(A, B)))
    elif sc == "get-conns":
        must(s.cmd("get-conns"))
    elif sc == "list-conns":
        s.register("list-conn")
        must(s.cmd("list-conns", {}))
        s.unregister("list-conn")
    elif sc == "initiate":
        must(s.cmd("initiate", {"child": NAME, "timeout": "10000"}))
    elif sc == "list-sas":
        s.register("list-sa")
        must(s.cmd("list-sas", {}))
        s.unregister("list-sa")
    elif sc == "terminate":
        must(s.cmd("terminate", {"ike": NAME, "timeout": "10000"}))
    elif sc == "unload-conn":
        must(s.cmd("unload-conn", {"name": NAME}))
    elif sc == "unload-shared":
        must(s.cmd("unload-shared", {"id": "ipsec-mesh-psk"}))
    elif sc == "initiate-unknown-child":
        must(s.cmd("initiate", {"child": "no-such-child", "timeout": "10000"}), ok=False)
    elif sc == "load-conn-bad-proposal":
        must(s.cmd("load-conn", conn(A, B, proposals=("bogus-alg-modp9999",))), ok=False)
    elif sc == "unload-conn-unknown":
        must(s.cmd("unload-conn", {"name": "no-such-conn"}), ok=False)
    elif sc == "cmd-unknown":
        (t, _, _), _ = s.cmd("no-such-command")
        assert t == CMD_UNKNOWN
    elif sc == "event-unknown":
        (t, _, _), _ = s.register("no-such-event")
        assert t == EVENT_UNKNOWN
    elif sc == "monitor-updown":
        # this session only listens; another client (not recorded) drives charon
        s.register("ike-updown")
        s.register("child-updown")
        must(direct(direct_path, "initiate", {"child": NAME, "timeout": "10000"}))
        s.drain(0.5)
        must(direct(direct_path, "terminate", {"ike": NAME, "timeout": "10000"}))
        s.drain(0.5)
        s.unregister("ike-updown")
        s.unregister("child-updown")
    elif sc == "rekey-events":
        evs = ("ike-updown", "child-updown", "ike-rekey", "child-rekey")
        for ev in evs:
            s.register(ev)
        must(s.cmd("initiate", {"child": NAME, "timeout": "10000"}))
        s.drain(0.3)
        # `rekey` only queues the job: its response precedes the rekey events
        must(s.cmd("rekey", {"child": NAME}))
        s.drain(0.5)
        must(s.cmd("rekey", {"ike": NAME}))
        s.drain(0.5)
        must(s.cmd("terminate", {"ike": NAME, "timeout": "10000"}))
        s.drain(0.3)
        for ev in evs:
            s.unregister(ev)
    elif sc == "initiate-no-kernel-esp":
        s.register("control-log")
        must(s.cmd("initiate", {"child": NAME, "timeout": "10000", "loglevel": "1"}), ok=False)
        s.unregister("control-log")
    else:
        raise SystemExit(f"unknown scenario {sc}")


def main():
    sc, path = sys.argv[1], sys.argv[2]
    if sc == "setup":
        me, peer = (A, B) if sys.argv[3] == "a" else (B, A)
        # the lower id rekeys, the other side never does
        must(direct(path, "load-shared", shared(me, peer)))
        must(direct(path, "load-conn", conn(me, peer, rekey=me["id"] < peer["id"])))
        return
    if sc == "initiate-direct":
        must(direct(path, "initiate", {"child": NAME, "timeout": "10000"}))
        return
    s = Session(path)
    try:
        scenario(sc, s, sys.argv[3] if len(sys.argv) > 3 else None)
    finally:
        s.close()


if __name__ == "__main__":
    main()
