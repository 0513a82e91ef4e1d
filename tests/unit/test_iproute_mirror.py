"""The ``iproute`` backend's mirror of the kernel's addresses, without a kernel: ``parse_netlink`` on
rtnetlink datagrams built here (addresses with label and peer, interfaces, bridge-port messages left out,
the end and the error of a dump, several messages in one datagram, a truncated one) and ``AddressState``
(what ``up``, ``down``, ``active`` and the interface choice ask it)."""
from __future__ import annotations

import json
import socket
import struct

from plugins.iproute import (IFA_ADDRESS, IFA_LABEL, IFA_LOCAL, IFLA_IFNAME, NLMSG_DONE, NLMSG_ERROR, RTM_DELADDR,
                             RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK, AddressState, NlEvent, _Addr, parse_netlink,
                             record_text)

AF_BRIDGE = 7


def rta(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def msg(kind: int, body: bytes, seq: int = 0, flags: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def addr(kind: int, ip: str, prefix: int, index: int, label: str | None = None, peer: str | None = None,
         family: int = socket.AF_INET, seq: int = 0) -> bytes:
    body = struct.pack("=BBBBI", family, prefix, 0, 0, index)
    body += rta(IFA_ADDRESS, socket.inet_aton(peer or ip)) + rta(IFA_LOCAL, socket.inet_aton(ip))
    if label is not None:
        body += rta(IFA_LABEL, label.encode() + b"\0")
    return msg(kind, body, seq)


def link(kind: int, index: int, name: str, family: int = socket.AF_UNSPEC, seq: int = 0) -> bytes:
    body = struct.pack("=BxHiII", family, 1, index, 0, 0) + rta(IFLA_IFNAME, name.encode() + b"\0")
    body += rta(4, struct.pack("=I", 1500))           # IFLA_MTU: attributes not read are skipped
    return msg(kind, body, seq)


def test_address_and_interface_messages_in_one_datagram() -> None:
    data = (link(RTM_NEWLINK, 2, "eth0") + addr(RTM_NEWADDR, "198.18.0.11", 24, 2, "eth0")
            + addr(RTM_NEWADDR, "198.18.0.100", 24, 2, "eth0:pa") + addr(RTM_DELADDR, "10.9.0.1", 32, 2, None, "10.9.0.2")
            + link(RTM_DELLINK, 5, "veth9"))
    events, done, err = parse_netlink(data, 7)
    assert events == [
        NlEvent(True, index=2, name="eth0"),
        NlEvent(True, _Addr("198.18.0.11", 24, 2, "eth0"), peer="198.18.0.11"),
        NlEvent(True, _Addr("198.18.0.100", 24, 2, "eth0:pa"), peer="198.18.0.100"),
        NlEvent(False, _Addr("10.9.0.1", 32, 2, None), peer="10.9.0.2"),
        NlEvent(False, index=5, name="veth9")]
    assert (done, err) == (False, 0)


def test_bridge_port_messages_and_other_families_are_left_out() -> None:
    data = link(RTM_DELLINK, 2, "eth0", family=AF_BRIDGE) + addr(RTM_NEWADDR, "198.18.0.1", 24, 2, family=10)
    assert parse_netlink(data, 1) == ([], False, 0)


def test_the_end_and_the_error_of_our_dump_only() -> None:
    done = msg(NLMSG_DONE, struct.pack("=i", 0), seq=3)
    assert parse_netlink(done, 3)[1] is True
    assert parse_netlink(done, 4)[1] is False                  # someone else's dump
    error = msg(NLMSG_ERROR, struct.pack("=i", -16) + b"\0" * 16, seq=3)
    assert parse_netlink(error, 3)[2] == 16                     # EBUSY
    ack = msg(NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16, seq=3)
    assert parse_netlink(ack, 3) == ([], False, 0)


def test_a_truncated_message_ends_the_datagram() -> None:
    whole = addr(RTM_NEWADDR, "198.18.0.5", 24, 2, "eth0:pa")
    events, _, _ = parse_netlink(whole + whole[:30], 0)
    assert [e.addr.ip for e in events if e.addr] == ["198.18.0.5"]


def ev(new: bool, ip: str, prefix: int = 24, index: int = 2, label: str | None = None, peer: str = "") -> NlEvent:
    return NlEvent(new, _Addr(ip, prefix, index, label), peer=peer or ip)


def test_address_state_answers_what_the_backend_asks() -> None:
    s = AddressState("pa")
    s.apply([NlEvent(True, index=1, name="lo"), NlEvent(True, index=2, name="eth0"),
             NlEvent(True, index=3, name="eth1"),
             ev(True, "198.18.0.11", 24, 2, "eth0"), ev(True, "198.18.0.100", 24, 2, "eth0:pa"),
             ev(True, "198.18.0.101", 24, 2, "eth0:x"), ev(True, "10.0.0.1", 16, 3, "eth1"),
             ev(True, "198.18.0.100", 24, 3, "eth1")])
    assert [(a.ip, a.index) for a in s.at("198.18.0.100")] == [("198.18.0.100", 2), ("198.18.0.100", 3)]
    assert s.present("198.18.0.100", "eth0") and s.present("198.18.0.100", "eth1")
    assert not s.present("198.18.0.100", "lo") and not s.present("198.18.0.7", "eth0")
    # the interface choice looks at every address whose subnet has the IP, but those labelled ours
    assert sorted((a.ip, a.index) for a in s.candidates("198.18.0.7")) == [
        ("198.18.0.100", 3), ("198.18.0.101", 2), ("198.18.0.11", 2)]
    assert [a.ip for a in s.candidates("10.0.200.1")] == ["10.0.0.1"]
    assert s.candidates("192.0.2.1") == []
    s.apply([ev(False, "198.18.0.100", 24, 3, "eth1"), ev(False, "198.18.0.11", 24, 2, "eth0")])
    assert [a.index for a in s.at("198.18.0.100")] == [2]
    assert [a.ip for a in s.candidates("198.18.0.7")] == ["198.18.0.101"]


def test_a_renamed_interface_changes_what_is_labelled_ours() -> None:
    s = AddressState("pa")
    s.apply([NlEvent(True, index=2, name="eth0"), ev(True, "198.18.0.100", 24, 2, "eth0:pa")])
    assert s.candidates("198.18.0.7") == []
    s.apply([NlEvent(True, index=2, name="lan0")])               # the label no longer names the interface
    assert [a.ip for a in s.candidates("198.18.0.7")] == ["198.18.0.100"]
    s.apply([NlEvent(True, index=2, name="lan0"), ev(True, "198.18.0.100", 24, 2, "lan0:pa")])   # relabelled
    assert s.candidates("198.18.0.7") == []
    s.apply([NlEvent(False, index=2, name="lan0")])
    assert s.links == {} and not s.present("198.18.0.100", "lan0")


def test_an_address_is_one_local_peer_prefix_and_interface() -> None:
    s = AddressState("pa")
    s.apply([NlEvent(True, index=2, name="ppp0"), ev(True, "10.9.0.1", 32, 2, peer="10.9.0.2"),
             ev(True, "10.9.0.1", 32, 2, peer="10.9.0.3"), ev(True, "10.9.0.1", 32, 2, peer="10.9.0.3")])
    assert len(s.at("10.9.0.1")) == 2
    s.apply([ev(False, "10.9.0.1", 32, 2, peer="10.9.0.2")])
    assert len(s.at("10.9.0.1")) == 1 and s.present("10.9.0.1", "ppp0")
    s.clear()
    assert s.at("10.9.0.1") == [] and s.links == {}


def test_the_record_text_is_what_json_dumps_writes() -> None:
    rec = {"d2/1": {"ip": "198.18.0.101", "prefix": 24, "ifname": "eth0", "arping": {"pid": 9, "start": 77}},
           "d1/2": {"prefix": 24, "ip": "198.18.0.100", "ifname": "eth0"}, 'q"uote/1': {"ip": "1.2.3.4"}}
    frags = {k: json.dumps(v, sort_keys=True) for k, v in rec.items()}
    assert record_text(frags) == json.dumps({"addresses": rec}, sort_keys=True)
    assert record_text({}) == json.dumps({"addresses": {}}, sort_keys=True)
