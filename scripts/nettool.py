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
  flood --dst IP:PORT --bytes B --size S
      Like udp-send without pacing or retries: errors are counted, not retried.
      {"sent", "bytes", "seconds", "pps", "mbps", "errors"}

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
    while sent < count:
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
    p.set_defaults(fn=flood)

    args = ap.parse_args()
    if getattr(args, "window", 1) < 1 or getattr(args, "count", 1) < 0:
        ap.error("--window must be >= 1 and --count >= 0")
    try:
        sys.exit(args.fn(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
