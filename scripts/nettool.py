#!/usr/bin/env python3
"""nettool.py: host-side UDP tools for Godwit's network tests and benchmarks.

Python 3 standard library only. Run it where the guests' bridge is, e.g.
``ip netns exec gwtest python3 scripts/nettool.py ...``. Every subcommand prints one
JSON object as its last line of standard output (progress, if any, goes to stderr).

  udp-echo-client --dst IP:PORT --count N [--sizes 1,64,512,1472] [--timeout S] [--window W]
      N datagrams, sizes cycling through --sizes, each with unique contents (a run id and
      the sequence number in the first 8 bytes when the size allows, random bytes after);
      at most W (default 32) unanswered at a time. Every reply is compared byte for byte
      with what was sent. A datagram unanswered for S seconds (default 5) is lost.
      {"sent", "received", "mismatched", "lost", "late", "seconds", "pps", "rtt_p50_us",
       "rtt_p99_us", "rtt_max_us"}; exit status 0 only if every datagram came back intact.
  udp-send --dst IP:PORT --bytes B --size S [--mbps R]
      B bytes of payload in datagrams of S bytes (the last one shorter if needed) as fast as
      the socket takes them (or paced to R Mbit/s); a datagram refused with ENOBUFS/EAGAIN is
      retried, so every one counted was handed to the kernel. Payload: the sequence number
      (8 bytes big-endian, truncated for S < 8), then bytes (i * 7 + 1) & 0xff.
      {"sent", "bytes", "seconds", "pps", "mbps", "retries"}
  udp-recv --port P [--seconds N] [--idle S] [--bind ADDR]
      Counts datagrams to port P for N seconds (default 10), ending early S seconds
      (default 2) after the last one once something arrived; rates are measured from the
      first datagram to the last. With 8-byte sequence numbers in the payload (udp-send,
      the guest's net-send) it also reports gaps (sequence numbers never seen) and dups.
      {"datagrams", "bytes", "seconds", "pps", "mbps", "idle", "seq_gaps", "seq_dups"}
  flood --dst IP:PORT --bytes B --size S [--seconds T]
      Like udp-send without pacing or retries: errors are counted, not retried.
      Stops after B bytes or, with --seconds, after T seconds, whichever comes first.
      {"sent", "bytes", "seconds", "pps", "mbps", "errors"}

  malformed --iface BRIDGE --dst IP --dst-mac MAC [--fuzz N] [--seed S]
      A hostile host: raw Ethernet frames (AF_PACKET, needs root) at the guest, one for
      each validation rule of the test guest's stack (bad lengths, header lengths,
      checksums, fragments, foreign addresses, unknown protocols...), then N fuzzed frames
      (random bytes, and valid ICMP/UDP echo frames with random bits flipped). Also three
      unusual but valid frames (IP options, Ethernet padding, UDP without checksum), whose
      replies it waits for. After it the guest must still answer (ping / udp-echo-client).
      {"frames", "expected_drops": {reason: count}, "valid_replied": {case: bool}, "fuzz"}
      expected_drops matches the guest's drop_reasons (net-echo) for the rule frames.

mbps is payload bits per microsecond (UDP payload only, no headers).
"""

import argparse
import errno
import json
import os
import random
import select
import socket
import struct
import sys
import time


def parse_dst(s):
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError("expected IP:PORT, got %r" % s)
    try:
        socket.inet_aton(host)
        p = int(port)
    except (OSError, ValueError):
        raise argparse.ArgumentTypeError("expected IP:PORT, got %r" % s)
    if not 1 <= p <= 65535:
        raise argparse.ArgumentTypeError("port out of range: %r" % s)
    return host, p


def parse_size(s):
    """An integer with an optional K/M/G suffix (powers of 1024)."""
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1:].lower(), 1)
    try:
        return int(s[:-1] if mult > 1 else s, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError("not a size: %r" % s)


def payload_size(s):
    v = parse_size(s)
    if not 1 <= v <= 65507:
        raise argparse.ArgumentTypeError("datagram size out of range: %r" % s)
    return v


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def big_buffers(sock):
    for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if opt is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
                break
            except OSError:
                pass
    for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
        if opt is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                break
            except OSError:
                pass


def percentile(sorted_values, p):
    if not sorted_values:
        return 0
    return sorted_values[(len(sorted_values) - 1) * p // 100]


# ------------------------------------------------------------------ udp-echo-client

def udp_echo_client(args):
    sizes = [payload_size(x) for x in args.sizes.split(",") if x]
    if not sizes:
        raise SystemExit("--sizes is empty")
    host, port = args.dst
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big_buffers(sock)
    sock.connect((host, port))
    sock.setblocking(False)
    rng = random.Random(args.seed if args.seed is not None else os.urandom(8))
    run_id = rng.getrandbits(32)

    def make(seq):
        size = sizes[seq % len(sizes)]
        if size >= 8:
            head = struct.pack(">II", run_id, seq)
            return head + rng.getrandbits(8 * (size - 8)).to_bytes(size - 8, "little") if size > 8 else head
        return (seq & ((1 << (8 * size)) - 1)).to_bytes(size, "big")

    by_payload = {}   # payload -> [seq, ...] (several only for tiny sizes)
    outstanding = {}  # seq -> (payload, send time)
    expired = set()   # seqs given up on, for "late"
    sent = received = mismatched = lost = late = 0
    rtts = []
    bufsize = max(sizes) + 1
    t0 = time.monotonic()
    last_activity = t0
    next_expiry_scan = t0

    def forget(seq):
        payload, _ = outstanding.pop(seq)
        seqs = by_payload[payload]
        seqs.remove(seq)
        if not seqs:
            del by_payload[payload]

    while sent < args.count or outstanding:
        while sent < args.count and len(outstanding) < args.window:
            payload = make(sent)
            try:
                sock.send(payload)
            except BlockingIOError:
                break
            except ConnectionRefusedError:  # an ICMP error for an earlier datagram
                continue
            now = time.monotonic()
            outstanding[sent] = (payload, now)
            by_payload.setdefault(payload, []).append(sent)
            sent += 1
            last_activity = now
        r, _, _ = select.select([sock], [], [], 0.05)
        now = time.monotonic()
        while r:
            try:
                data = sock.recv(bufsize)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            now = time.monotonic()
            last_activity = now
            seqs = by_payload.get(data)
            if seqs:
                seq = seqs[0]
                rtts.append(now - outstanding[seq][1])
                forget(seq)
                received += 1
                continue
            if len(data) >= 8:
                rid, seq = struct.unpack_from(">II", data)
                if rid == run_id and seq in outstanding:
                    forget(seq)
                    mismatched += 1
                    continue
                if rid == run_id and seq in expired:
                    late += 1
                    continue
            mismatched += 1
        if now >= next_expiry_scan:
            for seq in [s for s, (_, t) in outstanding.items() if now - t > args.timeout]:
                forget(seq)
                expired.add(seq)
                lost += 1
            next_expiry_scan = now + 0.1
        if sent == args.count and outstanding and now - last_activity > args.timeout:
            break
    lost += len(outstanding)
    seconds = time.monotonic() - t0
    rtts.sort()
    us = lambda v: int(v * 1e6)
    emit({"sent": sent, "received": received, "mismatched": mismatched, "lost": lost, "late": late,
          "seconds": round(seconds, 3), "pps": int(received / seconds) if seconds > 0 else 0,
          "rtt_p50_us": us(percentile(rtts, 50)), "rtt_p99_us": us(percentile(rtts, 99)),
          "rtt_max_us": us(rtts[-1]) if rtts else 0})
    return 0 if received == sent and mismatched == 0 else 1


# ------------------------------------------------------------------ senders

def send_loop(args, retry, pace_mbps):
    host, port = args.dst
    size, total = args.size, args.bytes
    if total < 1:
        raise SystemExit("--bytes must be at least 1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big_buffers(sock)
    sock.connect((host, port))
    buf = bytearray((i * 7 + 1) & 0xFF for i in range(size))
    count = (total + size - 1) // size
    last_len = total - (count - 1) * size
    view = memoryview(buf)
    seqlen = min(8, size)
    sent = nbytes = retries = errors = 0
    send = sock.send
    t0 = time.monotonic()
    bytes_per_s = pace_mbps * 1e6 / 8 if pace_mbps else 0
    deadline = t0 + args.seconds if getattr(args, "seconds", None) else None
    while sent < count:
        if deadline is not None and sent % 256 == 0 and time.monotonic() >= deadline:
            break
        n = size if sent < count - 1 else last_len
        buf[:seqlen] = sent.to_bytes(8, "big")[:seqlen]
        try:
            send(view[:n])
        except OSError as e:
            if e.errno in (errno.ENOBUFS, errno.EAGAIN, errno.ECONNREFUSED, errno.EINTR):
                if retry:
                    retries += 1
                    if e.errno != errno.ECONNREFUSED:
                        time.sleep(0.0001)
                    continue
                errors += 1
            else:
                raise
        sent += 1
        nbytes += n
        if bytes_per_s and sent % 16 == 0:
            ahead = nbytes / bytes_per_s - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    seconds = max(time.monotonic() - t0, 1e-9)
    out = {"sent": sent, "bytes": nbytes, "seconds": round(seconds, 3), "pps": int(sent / seconds),
           "mbps": round(nbytes * 8 / seconds / 1e6, 1)}
    out["retries" if retry else "errors"] = retries if retry else errors
    emit(out)
    return 0


def udp_send(args):
    return send_loop(args, retry=True, pace_mbps=args.mbps)


def flood(args):
    return send_loop(args, retry=False, pace_mbps=0)


# ------------------------------------------------------------------ udp-recv

def udp_recv(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    big_buffers(sock)
    sock.bind((args.bind, args.port))
    sock.setblocking(False)
    buf = bytearray(65536)
    recv_into = sock.recv_into
    datagrams = nbytes = 0
    t_first = t_last = 0.0
    seen = bytearray()  # one byte per sequence number
    seq_ok = True
    dups = 0
    idle = False
    start = time.monotonic()
    end = start + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if datagrams and now - t_last >= args.idle:
            idle = True
            break
        wait = end - now if not datagrams else min(end - now, t_last + args.idle - now)
        r, _, _ = select.select([sock], [], [], max(wait, 0))
        if not r:
            continue
        while True:
            try:
                n = recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            t_last = time.monotonic()
            if not datagrams:
                t_first = t_last
            datagrams += 1
            nbytes += n
            if seq_ok:
                if n < 8:
                    seq_ok = False
                    continue
                seq = int.from_bytes(buf[:8], "big")
                if seq >= 1 << 24:
                    seq_ok = False
                    continue
                if seq >= len(seen):
                    seen.extend(bytes(seq + 1 - len(seen)))
                if seen[seq]:
                    dups += 1
                seen[seq] = 1
    seconds = t_last - t_first
    out = {"datagrams": datagrams, "bytes": nbytes, "seconds": round(seconds, 6),
           "pps": int(datagrams / seconds) if seconds > 0 else 0,
           "mbps": round(nbytes * 8 / seconds / 1e6, 1) if seconds > 0 else 0.0, "idle": idle,
           "seq_gaps": (len(seen) - seen.count(1)) if seq_ok and datagrams else None,
           "seq_dups": dups if seq_ok and datagrams else None}
    emit(out)
    return 0 if datagrams else 1


# ------------------------------------------------------------------ malformed

def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def malformed(args):
    iface = args.iface
    with open("/sys/class/net/%s/address" % iface) as f:
        src_mac = bytes.fromhex(f.read().strip().replace(":", ""))
    dst_mac = bytes.fromhex(args.dst_mac.replace(":", ""))
    dst_ip = socket.inet_aton(args.dst)
    src_ip = socket.inet_aton(args.src)
    rng = random.Random(args.seed)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((iface, 0))
    sock.settimeout(0.05)

    def eth(payload, etype=0x0800, dst=dst_mac, src=src_mac):
        return dst + src + struct.pack("!H", etype) + payload

    def ip(payload, proto=17, ihl=5, tot=None, frag=0, src=src_ip, dst=dst_ip, opts=b"", good_csum=True,
           version=4):
        tot = 4 * ihl + len(payload) if tot is None else tot
        h = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, tot & 0xFFFF, rng.getrandbits(16), frag, 64, proto,
                        0, src, dst) + opts
        c = _csum(h)
        if not good_csum:
            c ^= 0x1234
        return h[:10] + struct.pack("!H", c) + h[12:] + payload

    def udp(payload, sport=40000, dport=7, ulen=None, csum="good", src=src_ip, dst=dst_ip):
        ulen = 8 + len(payload) if ulen is None else ulen
        h = struct.pack("!HHHH", sport, dport, ulen & 0xFFFF, 0)
        if csum == "zero":
            return h + payload
        ph = src + dst + struct.pack("!BBH", 0, 17, 8 + len(payload))
        c = _csum(ph + h + payload) or 0xFFFF
        if csum == "bad":
            c ^= 0x00F0
        return h[:6] + struct.pack("!H", c) + payload

    def icmp(typ=8, code=0, ident=0x4242, seq=1, data=b"godwit-hostile", good_csum=True):
        h = struct.pack("!BBHHH", typ, code, 0, ident, seq) + data
        c = _csum(h) ^ (0 if good_csum else 0x0F0F)
        return h[:2] + struct.pack("!H", c) + h[4:]

    arp_ok = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, src_ip, b"\0" * 6, dst_ip)
    mcast_mac = bytes.fromhex("01005e000001")
    other_ip = socket.inet_aton("10.77.0.250")
    cases = [  # (expected drop reason, frame)
        ("ethertype", eth(b"\0" * 46, 0x86DD)),
        ("ethertype", eth(b"\0" * 46, 0x8100)),
        ("mac", eth(ip(icmp()), dst=bytes.fromhex("020000000099"))),
        ("mac", eth(ip(icmp()), dst=mcast_mac)),
        ("src", eth(ip(icmp()), src=mcast_mac)),
        ("arp-short", eth(arp_ok[:20], 0x0806)),
        ("arp-bad", eth(struct.pack("!H", 6) + arp_ok[2:], 0x0806)),
        ("arp-bad", eth(arp_ok[:6] + struct.pack("!H", 9) + arp_ok[8:], 0x0806)),
        ("arp-bad", eth(arp_ok[:4] + bytes([16, 4]) + arp_ok[6:], 0x0806)),
        ("src", eth(arp_ok[:8] + mcast_mac + arp_ok[14:], 0x0806)),
        ("ip-short", eth(b"\x45\0\0\x14" + b"\0" * 12)),
        ("ip-version", eth(ip(icmp(), version=6))),
        ("ip-hlen", eth(ip(icmp(), ihl=4))),
        ("ip-hlen", eth(ip(b"", ihl=15, tot=60)[:20] + b"\0" * 10)),
        ("ip-len", eth(ip(icmp(), tot=200))),
        ("ip-len", eth(ip(icmp(), tot=12))),
        ("ip-csum", eth(ip(icmp(), good_csum=False))),
        ("ip-frag", eth(ip(icmp(), frag=0x2000))),
        ("ip-frag", eth(ip(icmp(), frag=0x0010))),
        ("ip-dst", eth(ip(icmp(), dst=other_ip))),
        ("ip-dst", eth(ip(icmp(), dst=socket.inet_aton("255.255.255.255")))),
        ("src", eth(ip(icmp(), src=socket.inet_aton("0.0.0.0")))),
        ("src", eth(ip(icmp(), src=socket.inet_aton("224.0.0.1")))),
        ("src", eth(ip(icmp(), src=socket.inet_aton("127.0.0.1")))),
        ("src", eth(ip(icmp(), src=dst_ip))),
        ("ip-proto", eth(ip(b"\0" * 20, proto=6))),
        ("icmp-short", eth(ip(b"\x08\0\xf7\xff", proto=1))),
        ("icmp-csum", eth(ip(icmp(good_csum=False), proto=1))),
        ("icmp-type", eth(ip(icmp(typ=13), proto=1))),
        ("icmp-type", eth(ip(icmp(typ=8, code=1), proto=1))),
        ("icmp-type", eth(ip(icmp(typ=0, ident=0x7777), proto=1))),
        ("udp-short", eth(ip(b"\0\x07\0\x07", proto=17))),
        ("udp-len", eth(ip(udp(b"x" * 20, ulen=100)))),
        ("udp-len", eth(ip(udp(b"x" * 20, ulen=4)))),
        ("udp-csum", eth(ip(udp(b"hostile", csum="bad")))),
        ("udp-port", eth(ip(udp(b"hostile", dport=9)))),
        ("udp-port", eth(ip(udp(b"hostile", sport=0)))),
    ]
    valid = {  # unusual but valid: each must be answered
        "ip-options": eth(ip(icmp(ident=0x0101, data=b"opts"), proto=1, ihl=6, opts=b"\x01\x01\x01\x00")),
        "eth-padding": eth(ip(icmp(ident=0x0202, data=b"pad"), proto=1) + b"\xee" * 20),
        "udp-no-csum": eth(ip(udp(b"nocsum", sport=40202, csum="zero"))),
    }
    expected = {}
    for reason, frame in cases:
        sock.send(frame)
        expected[reason] = expected.get(reason, 0) + 1
        time.sleep(0.002)

    replied = {k: False for k in valid}
    for name, frame in valid.items():
        sock.send(frame)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not all(replied.values()):
        try:
            f = sock.recv(2048)
        except socket.timeout:
            continue
        if f[:6] != src_mac or f[12:14] != b"\x08\x00" or f[26:30] != dst_ip:
            continue
        ihl = (f[14] & 15) * 4
        l4 = f[14 + ihl:]
        if f[23] == 1 and l4[0] == 0:
            ident = struct.unpack("!H", l4[4:6])[0]
            if ident == 0x0101 and l4[8:12] == b"opts":
                replied["ip-options"] = True
            if ident == 0x0202 and l4[8:11] == b"pad":
                replied["eth-padding"] = True
        if f[23] == 17 and struct.unpack("!H", l4[2:4])[0] == 40202 and l4[8:14] == b"nocsum":
            replied["udp-no-csum"] = True

    # fuzz: random frames, and valid echo frames with bits flipped
    templates = [eth(ip(icmp(ident=0x0303, data=bytes(rng.getrandbits(8) for _ in range(64))), proto=1)),
                 eth(ip(udp(bytes(rng.getrandbits(8) for _ in range(100)), sport=40303))),
                 eth(arp_ok, 0x0806)]
    for i in range(args.fuzz):
        if i % 3 == 0:
            n = rng.randint(14, 1514)
            body = bytes(rng.getrandbits(8) for _ in range(n - 14))
            frame = eth(body, rng.choice([0x0800, 0x0806, rng.getrandbits(16)]))
        else:
            frame = bytearray(rng.choice(templates))
            for _ in range(rng.randint(1, 6)):
                pos = rng.randrange(14, len(frame))
                frame[pos] ^= 1 << rng.randrange(8)
            if rng.random() < 0.2:
                frame = frame[:rng.randint(14, len(frame))]
            frame = bytes(frame)
        try:
            sock.send(frame)
        except OSError:
            pass
        if i % 64 == 63:
            time.sleep(0.001)
    emit({"frames": len(cases) + len(valid), "expected_drops": expected, "valid_replied": replied, "fuzz": args.fuzz})
    return 0 if all(replied.values()) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("udp-echo-client", help="mixed-size datagrams to an echo service, each reply checked")
    p.add_argument("--dst", type=parse_dst, required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--sizes", default="1,64,512,1472")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=udp_echo_client)

    p = sub.add_parser("udp-send", help="send B bytes as fast as possible (or paced)")
    p.add_argument("--dst", type=parse_dst, required=True)
    p.add_argument("--bytes", type=parse_size, required=True)
    p.add_argument("--size", type=payload_size, default=1472)
    p.add_argument("--mbps", type=float, default=0.0)
    p.set_defaults(fn=udp_send)

    p = sub.add_parser("udp-recv", help="count datagrams to a port")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--idle", type=float, default=2.0)
    p.add_argument("--bind", default="0.0.0.0")
    p.set_defaults(fn=udp_recv)

    p = sub.add_parser("flood", help="blast datagrams, no pacing, no retries")
    p.add_argument("--dst", type=parse_dst, required=True)
    p.add_argument("--bytes", type=parse_size, required=True)
    p.add_argument("--size", type=payload_size, default=1472)
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.set_defaults(fn=flood)

    p = sub.add_parser("malformed", help="hostile frames at a guest (raw sockets, root)")
    p.add_argument("--iface", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dst-mac", required=True)
    p.add_argument("--src", default="10.77.0.1")
    p.add_argument("--fuzz", type=int, default=10000)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(fn=malformed)

    args = ap.parse_args()
    if getattr(args, "window", 1) < 1 or getattr(args, "count", 1) < 0:
        ap.error("--window must be >= 1 and --count >= 0")
    try:
        sys.exit(args.fn(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
