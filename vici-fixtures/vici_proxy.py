#!/usr/bin/env python3
"""Recording VICI proxy for ipsec-mesh fixtures: ONE client session, then exit.

usage: vici_proxy.py LISTEN_SOCKET UPSTREAM_SOCKET OUT_PREFIX

Listens on LISTEN_SOCKET, accepts exactly one client, connects it to charon's
UPSTREAM_SOCKET and forwards bytes both ways unchanged. Records:
  OUT_PREFIX.c2s.bin   every byte client -> charon, as on the wire
  OUT_PREFIX.s2c.bin   every byte charon -> client, as on the wire
  OUT_PREFIX.txt       both directions decoded packet by packet, in the order
                       complete packets reached the proxy (recorded before they
                       are forwarded, so a request precedes its response)
Exits when both directions are closed. Any VICI client works through it
(swanctl --uri unix://LISTEN_SOCKET, the Rust client, vici_client.py)."""
import os
import socket
import struct
import sys
import threading

from vici_wire import decode_packet, format_packet

def main():
    listen, upstream, prefix = sys.argv[1:4]
    if os.path.exists(listen):
        os.unlink(listen)
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(listen)
    ls.listen(1)
    client, _ = ls.accept()
    ls.close()
    os.unlink(listen)
    up = socket.socket(socket.AF_UNIX)
    up.connect(upstream)

    lock = threading.Lock()
    txt = open(prefix + ".txt", "w")
    seq = [0]

    def pump(src, dst, direction):
        raw = open(f"{prefix}.{direction}.bin", "wb")
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                raw.write(data)
                raw.flush()
                buf += data
                while len(buf) >= 4:
                    n = struct.unpack(">I", buf[:4])[0]
                    if len(buf) < 4 + n:
                        break
                    pkt, buf = buf[4:4 + n], buf[4 + n:]
                    with lock:
                        seq[0] += 1
                        txt.write(f"--- {seq[0]:03d} {direction} {4 + n} bytes\n")
                        txt.write(format_packet(*decode_packet(pkt)))
                        txt.flush()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            raw.close()
            if buf:
                with lock:
                    txt.write(f"!!! {direction}: {len(buf)} trailing bytes (incomplete packet)\n")
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    threads = [threading.Thread(target=pump, args=(client, up, "c2s")),
               threading.Thread(target=pump, args=(up, client, "s2c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    txt.close()

if __name__ == "__main__":
    main()
