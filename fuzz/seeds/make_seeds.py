#!/usr/bin/env python3
"""Writes the small seed inputs of the raw-byte fuzz targets into fuzz/seeds/<target>/.

The targets that take structured input (`arbitrary`) start from an empty corpus: their byte
layout is arbitrary's, not a file format, and libFuzzer finds its way there quickly.
Run from anywhere: python3 fuzz/seeds/make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def frame(kind, payload):
    return struct.pack("<I", len(payload)) + bytes([kind]) + payload


def hello(role):
    # Hello { magic: [u8; 4], protocol_version: u32 (1.0 = 1 << 16), role, software_version, features }
    version = varint(1 << 16)
    name = b"seed"
    return frame(0x01, b"AGVM" + version + varint(role) + varint(len(name)) + name + varint(0x7F))


def data(request_id, stream, payload):
    return frame(0x04, varint(request_id) + varint(stream) + varint(len(payload)) + payload)


def ping(request_id):
    return frame(0x08, varint(request_id))


def dns_query(name, qtype=1, query_id=0x1234):
    header = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack(">HH", qtype, 1)


def client_hello(sni):
    name = sni.encode()
    server_name = struct.pack(">HBH", len(name) + 3, 0, len(name)) + name
    extensions = struct.pack(">HH", 0, len(server_name)) + server_name
    body = (
        b"\x03\x03" + bytes(32) + b"\x00"  # version, random, empty session id
        + b"\x00\x02\x13\x01"  # one cipher suite
        + b"\x01\x00"  # null compression
        + struct.pack(">H", len(extensions)) + extensions
    )
    handshake = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def write(target, name, content):
    directory = os.path.join(HERE, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(content)


# protocol_*: one chunk-size byte, then the stream.
write("protocol_host_to_guest", "hello-ping-data", b"\x07" + hello(0) + ping(1) + data(1, 0, b"hi"))
write("protocol_guest_to_host", "hello-data", b"\x03" + hello(1) + data(1, 1, b"out") + data(1, 2, b""))
write("egress_dns", "a-allowed", dns_query("allowed.test"))
write("egress_dns", "a-sub", dns_query("www.allowed.test"))
write("egress_dns", "aaaa-denied", dns_query("denied.example", qtype=28))
# egress_sniff takes arbitrary's layout, but its last field (the bytes) takes the rest of the
# input, so a request or ClientHello behind a few zero bytes is a usable start.
write("egress_sniff", "http-get", bytes(4) + b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
write("egress_sniff", "http-chunked", bytes(4) + b"POST /u HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
write("egress_sniff", "tls-sni", bytes(4) + client_hello("allowed.test"))
