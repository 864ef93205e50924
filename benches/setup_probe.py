#!/usr/bin/env python3
"""Call set-up latency through a SIP server: INVITE sent -> 200 received, measured with a
monotonic clock in microseconds (SIPp's response times are whole milliseconds, too coarse
for loopback). Makes CALLS calls one after the other (INVITE, 200, ACK, BYE, 200) from
127.0.0.1 to the server; the server routes them to whatever answers (benches/latency.sh:
SIPp's uas), while other load runs beside it.

Usage: setup_probe.py SERVER_PORT CALLS
Prints: "ok N median_us p99_us max_us" (N answered calls).
"""
import random
import socket
import statistics
import sys
import time


def main():
    port, calls = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    me = sock.getsockname()[1]
    server = ("127.0.0.1", port)
    times = []
    for n in range(calls):
        call_id = f"probe-{random.getrandbits(48):x}-{n}@127.0.0.1"
        tag = f"{random.getrandbits(32):x}"
        branch = f"z9hG4bK{random.getrandbits(48):x}"

        def request(method, cseq, to_tag="", branch=branch, body="", ruri=None, routes=()):
            to = "<sip:service@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
            ruri = ruri or f"sip:service@127.0.0.1:{port}"
            return (
                f"{method} {ruri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch={branch};rport\r\n"
                + "".join(f"Route: {r}\r\n" for r in routes)
                + f"Max-Forwards: 70\r\n"
                f"From: <sip:probe@127.0.0.1>;tag={tag}\r\n"
                f"To: {to}\r\n"
                f"Call-ID: {call_id}\r\n"
                f"CSeq: {cseq} {method}\r\n"
                f"Contact: <sip:probe@127.0.0.1:{me}>\r\n"
                + ("Content-Type: application/sdp\r\n" if body else "")
                + f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()

        sdp = (
            "v=0\r\no=probe 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
            "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
        )
        t0 = time.perf_counter()
        sock.sendto(request("INVITE", 1, body=sdp), server)
        to_tag, contact, routes = None, None, []
        try:
            while True:
                data = sock.recv(65535).decode(errors="replace")
                if call_id not in data:
                    continue
                status = int(data.split(" ", 2)[1]) if data.startswith("SIP/2.0") else 0
                if status >= 200 and "INVITE" in data.split("CSeq:", 1)[1].split("\r\n", 1)[0]:
                    t1 = time.perf_counter()
                    for line in data.split("\r\n"):
                        name, _, value = line.partition(":")
                        name, value = name.strip().lower(), value.strip()
                        if name in ("to", "t") and ";tag=" in value:
                            to_tag = value.split(";tag=", 1)[1].split(";")[0].strip()
                        elif name in ("contact", "m") and "<" in value:
                            contact = value.split("<", 1)[1].split(">", 1)[0]
                        elif name == "record-route":
                            routes.extend(r.strip() for r in value.split(","))
                    break
        except socket.timeout:
            continue
        if status != 200 or not to_tag:
            continue
        times.append((t1 - t0) * 1e6)
        # In-dialog (RFC 3261 12.2.1.1): the 200's Contact as Request-URI, its Record-Route
        # (reversed) as Route, sent to the server.
        routes.reverse()
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            branch = f"z9hG4bK{random.getrandbits(48):x}"
            sock.sendto(request(method, cseq, to_tag, branch, "", contact, routes), server)
        try:
            while True:
                data = sock.recv(65535).decode(errors="replace")
                if call_id in data and data.startswith("SIP/2.0") and "BYE" in data:
                    break
        except socket.timeout:
            pass
    if not times:
        print("ok 0 0 0 0")
        return
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"ok {len(times)} {statistics.median(times):.0f} {p99:.0f} {times[-1]:.0f}")


if __name__ == "__main__":
    main()
