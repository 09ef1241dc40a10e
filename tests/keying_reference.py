#!/usr/bin/env python3
"""Independent reference implementation of ipsec-mesh's key and identifier derivation
(docs/keying.md), written from the spec with Python's hmac/hashlib only. tests/keying_vectors.rs
runs it and checks that the project (Rust, ring), this script and the table in docs/keying.md
agree on every vector.

Prints one Markdown table row per vector:
| psk | src | dst | generation | transform | key | key id | spi | reqid of src at dst |
"""
import hashlib
import hmac
import struct

SALT = b"ipsec-mesh/v1 psk"
INFO_LABEL = b"ipsec-mesh/v1 esp"
KEY_ID_LABEL = b"ipsec-mesh/v1 key-id"
SLOT_LABEL = b"ipsec-mesh/v1 slot\x00"
SLOT_BITS = 27
REQID_BASE = 0x5000_0000
SPI_FLAG = 0x8000_0000
KEY_LEN = {  # encryption (+ salt) + integrity key bytes
    "aes128gcm16": 16 + 4,
    "aes256gcm16": 32 + 4,
    "aes128-sha256": 16 + 32,
    "aes256-sha256": 32 + 32,
}


def hkdf_sha256(psk: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(SALT, psk, hashlib.sha256).digest()  # RFC 5869 extract
    out, block, i = b"", b"", 1
    while len(out) < length:  # RFC 5869 expand
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def lp(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def key(psk: bytes, src: str, dst: str, gen: int, transform: str) -> bytes:
    info = (INFO_LABEL + lp(transform.encode()) + struct.pack(">I", gen)
            + lp(src.encode()) + lp(dst.encode()))
    return hkdf_sha256(psk, info, KEY_LEN[transform])


def key_id(k: bytes) -> str:
    return hashlib.sha256(KEY_ID_LABEL + k).digest()[:8].hex()


def slot_spread(host: str, attempt: int = 0):
    d = hashlib.sha256(SLOT_LABEL + host.encode() + struct.pack(">I", attempt)).digest()
    mask = (1 << SLOT_BITS) - 1
    return struct.unpack(">I", d[:4])[0] & mask, struct.unpack(">I", d[4:8])[0] & mask


def spi(src: str, dst: str, gen: int) -> int:
    return SPI_FLAG | ((slot_spread(src)[0] ^ slot_spread(dst)[1]) << 4) | (gen & 0xF)


def reqid(host: str) -> int:
    return REQID_BASE | slot_spread(host)[0]


VECTORS = [
    (b"0123456789abcdef0123456789abcdef", "host-a", "host-b", 1, "aes256gcm16"),
    (b"0123456789abcdef0123456789abcdef", "host-b", "host-a", 1, "aes256gcm16"),
    (b"0123456789abcdef0123456789abcdef", "host-a", "host-b", 2, "aes256gcm16"),
    (b"0123456789abcdef0123456789abcdef", "host-a", "host-b", 1, "aes128gcm16"),
    (b"0123456789abcdef0123456789abcdef", "host-a", "host-b", 1, "aes128-sha256"),
    (b"0123456789abcdef0123456789abcdef", "host-a", "host-b", 1, "aes256-sha256"),
    (bytes(range(48)), "node-17.example", "node-4", 7, "aes256gcm16"),
    (bytes(range(48)), "ab", "c", 1, "aes128gcm16"),
    (bytes(range(48)), "a", "bc", 1, "aes128gcm16"),
]

if __name__ == "__main__":
    for psk, src, dst, gen, t in VECTORS:
        k = key(psk, src, dst, gen, t)
        print(f"| {psk.hex()} | {src} | {dst} | {gen} | {t} | {k.hex()} | {key_id(k)} "
              f"| {spi(src, dst, gen):#010x} | {reqid(src):#010x} |")
