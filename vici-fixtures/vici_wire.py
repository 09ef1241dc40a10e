"""Minimal VICI wire format (strongSwan src/libcharon/plugins/vici/README.md), used by
the fixture capture tools only. The project's real codec is src/dataplane/charon/wire.rs.

Packet (after the 4-byte big-endian length): u8 type, [u8 name length, name] for the
named types, then message elements:
  1 SECTION_START u8 len + name   2 SECTION_END
  3 KEY_VALUE     u8 len + name, u16 len + value
  4 LIST_START    u8 len + name   5 LIST_ITEM u16 len + value   6 LIST_END
A message is an ordered mapping: values are bytes, nested dicts are sections, lists
of bytes are lists."""
import struct

TYPES = {0: "CMD_REQUEST", 1: "CMD_RESPONSE", 2: "CMD_UNKNOWN", 3: "EVENT_REGISTER",
         4: "EVENT_UNREGISTER", 5: "EVENT_CONFIRM", 6: "EVENT_UNKNOWN", 7: "EVENT"}
NAMED = {0, 3, 4, 7}
CMD_REQUEST, CMD_RESPONSE, CMD_UNKNOWN, EVENT_REGISTER, EVENT_UNREGISTER, \
    EVENT_CONFIRM, EVENT_UNKNOWN, EVENT = range(8)


def _b(v):
    return v if isinstance(v, bytes) else str(v).encode()


def encode_message(msg):
    out = b""
    for k, v in msg.items():
        kb = k.encode()
        if isinstance(v, dict):
            out += b"\x01" + bytes([len(kb)]) + kb + encode_message(v) + b"\x02"
        elif isinstance(v, list):
            out += b"\x04" + bytes([len(kb)]) + kb
            for item in v:
                ib = _b(item)
                out += b"\x05" + struct.pack(">H", len(ib)) + ib
            out += b"\x06"
        else:
            vb = _b(v)
            out += b"\x03" + bytes([len(kb)]) + kb + struct.pack(">H", len(vb)) + vb
    return out


def encode_packet(ptype, name=None, msg=None):
    body = bytes([ptype])
    if ptype in NAMED:
        nb = name.encode()
        body += bytes([len(nb)]) + nb
    if msg:
        body += encode_message(msg)
    return struct.pack(">I", len(body)) + body


def decode_message(b):
    """-> nested dict (sections), lists of bytes, bytes values."""
    root = {}
    stack = [root]
    cur_list = None
    i = 0
    while i < len(b):
        t = b[i]
        i += 1
        if t in (1, 3, 4):
            n = b[i]
            name = b[i + 1:i + 1 + n].decode()
            i += 1 + n
        if t == 1:
            sec = {}
            stack[-1][name] = sec
            stack.append(sec)
        elif t == 2:
            stack.pop()
        elif t == 3:
            n = struct.unpack(">H", b[i:i + 2])[0]
            stack[-1][name] = b[i + 2:i + 2 + n]
            i += 2 + n
        elif t == 4:
            cur_list = []
            stack[-1][name] = cur_list
        elif t == 5:
            n = struct.unpack(">H", b[i:i + 2])[0]
            cur_list.append(b[i + 2:i + 2 + n])
            i += 2 + n
        elif t == 6:
            cur_list = None
        else:
            raise ValueError(f"unknown element type {t} at offset {i - 1}")
    return root


def decode_packet(p):
    """p: packet without the 4-byte length -> (type, name, message dict)"""
    t = p[0]
    i = 1
    name = None
    if t in NAMED:
        n = p[1]
        name = p[2:2 + n].decode()
        i = 2 + n
    return t, name, decode_message(p[i:])


def format_message(msg, indent="  "):
    out = ""
    for k, v in msg.items():
        if isinstance(v, dict):
            out += f"{indent}{k} {{\n" + format_message(v, indent + "  ") + f"{indent}}}\n"
        elif isinstance(v, list):
            out += f"{indent}{k} = [" + ", ".join(x.decode(errors="replace") for x in v) + "]\n"
        else:
            out += f"{indent}{k} = {v.decode(errors='replace')}\n"
    return out


def format_packet(t, name, msg):
    head = TYPES.get(t, f"TYPE{t}") + (f" {name}" if name is not None else "")
    return head + "\n" + format_message(msg)
