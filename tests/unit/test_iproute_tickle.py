"""The ``iproute`` backend's pieces for a planned move, without a kernel: ``tcp_connections`` on a
``/proc/net/tcp`` table written here (only established sockets count, grouped by local address) and the
tickle ACK ``tickle_segment`` builds (ports, numbers, flags, a checksum the receiver accepts). On the wire,
with a real initiator socket: tests/contract/test_network_iproute.py."""
from __future__ import annotations

import socket
import struct
from pathlib import Path

from plugins.iproute import tcp_connections, tickle_segment


def hexaddr(ip: str, port: int) -> str:
    return f"{struct.unpack('=I', socket.inet_aton(ip))[0]:08X}:{port:04X}"


def row(n: int, local: tuple[str, int], remote: tuple[str, int], state: str) -> str:
    return (f"{n:4d}: {hexaddr(*local)} {hexaddr(*remote)} {state} 00000000:00000000 00:00000000 00000000"
            "     0        0 123 1 0000000000000000 20 4 30 10 -1")


def test_established_connections_by_local_address(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text("\n".join([
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
        row(0, ("0.0.0.0", 3260), ("0.0.0.0", 0), "0A"),                       # listening: not a connection
        row(1, ("198.18.0.100", 3260), ("198.18.0.50", 40001), "01"),
        row(2, ("198.18.0.100", 3260), ("198.18.0.51", 40000), "01"),
        row(3, ("198.18.0.100", 3260), ("198.18.0.52", 40002), "06"),          # TIME_WAIT
        row(4, ("198.18.0.101", 3260), ("198.18.0.50", 40003), "01"),
        "   5: garbage",
    ]) + "\n")
    got = tcp_connections(str(table))
    assert got == {"198.18.0.100": (("198.18.0.50", 40001, 3260), ("198.18.0.51", 40000, 3260)),
                   "198.18.0.101": (("198.18.0.50", 40003, 3260),)}


def test_the_tickle_is_a_bare_ack_with_numbers_outside_any_window() -> None:
    src, dst = "198.18.0.100", "198.18.0.50"
    seg = tickle_segment(src, dst, 3260, 40001)
    sport, dport, seq, ack, off, flags, win, csum, urg = struct.unpack("!HHIIBBHHH", seg)
    assert (sport, dport, seq, ack, off >> 4, flags, urg, len(seg)) == (3260, 40001, 0, 0, 5, 0x10, 0, 20)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(seg))
    words = pseudo + seg
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF, "the receiver's checksum over pseudo-header and segment comes out right"
