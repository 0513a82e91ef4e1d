"""The disk definition document (``agent.core.schema``): table tests of what is accepted and refused (with the
field reported), and property tests: whatever the input, ``parse``/``from_dict`` return a ``Disk`` or raise
``DefinitionError`` and nothing else; a mutated field is the field reported; secrets are never echoed."""
from __future__ import annotations

import ipaddress

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import schema
from agent.errors import DefinitionError
from agent.core.model import Chap, Disk, PathSpec

DISK = "d3f9a0c1"

SECRET = "s3cret-Passw0rd!"


def valid() -> dict[str, Any]:
    return {
        "version": 1, "id": DISK, "name": "vmstore", "pool": "rbd", "image": f"pathagent-{DISK}",
        "size": 1 << 30, "iqn": f"iqn.2016-05.io.pathagent:{DISK}",
        "serial": "6f1e07c2-8c84-4e55-9d59-2ad1a0e5b3f1",
        "paths": [{"index": 1, "ip": "198.18.0.100", "prefix": 24, "vlan": None, "role": None},
                  {"index": 2, "ip": "198.18.1.100", "prefix": 24, "vlan": 100, "role": "storage"}],
        "open": False, "initiators": ["iqn.1993-08.org.debian:01:abcdef"],
        "chap": {"user": "alice", "password": SECRET},
        "mutual_chap": {"user": "target", "password": "mutual-Secret-42"},
    }


def error_of(doc: Any) -> DefinitionError:
    with pytest.raises(DefinitionError) as ei:
        schema.from_dict(doc, DISK)
    return ei.value


def test_valid_document_parses_to_disk() -> None:
    disk = schema.parse(json.dumps(valid()), DISK)
    assert disk == Disk(
        id=DISK, name="vmstore", iqn=f"iqn.2016-05.io.pathagent:{DISK}", serial="6f1e07c2-8c84-4e55-9d59-2ad1a0e5b3f1",
        paths=(PathSpec(1, "198.18.0.100", 24), PathSpec(2, "198.18.1.100", 24, 100, "storage")),
        pool="rbd", image=f"pathagent-{DISK}", size=1 << 30, initiators=("iqn.1993-08.org.debian:01:abcdef",),
        chap=Chap("alice", SECRET), mutual_chap=Chap("target", "mutual-Secret-42"))


def test_round_trip_and_bytes_input() -> None:
    disk = schema.parse(json.dumps(valid()).encode(), DISK)
    assert schema.parse(schema.dump(disk), DISK) == disk
    assert schema.to_dict(disk) == valid()


def test_disk_without_pool_round_trips() -> None:
    disk = Disk(id=DISK, name="n", iqn="iqn.2016-05.io.x:y", serial=valid()["serial"],
                paths=(PathSpec(1, "198.18.0.1", 24),))
    assert schema.parse(schema.dump(disk), DISK) == disk


def test_minimal_document_defaults() -> None:
    doc = {k: valid()[k] for k in ("version", "id", "name", "iqn", "serial")}
    doc["paths"] = [{"index": 1, "ip": "198.18.0.1", "prefix": 32}]
    disk = schema.from_dict(doc, DISK)
    assert disk.initiators == ()          # no initiator admitted until access is set
    assert disk.chap is None and disk.mutual_chap is None and disk.size == 0 and disk.pool == ""


def test_open_disk_admits_any_initiator() -> None:
    doc = valid()
    doc["open"], doc["initiators"] = True, []
    assert schema.from_dict(doc, DISK).initiators is None


def test_paths_sorted_by_index_and_duplicate_initiators_dropped() -> None:
    doc = valid()
    doc["paths"].reverse()
    doc["initiators"] = ["iqn.1993-08.org.debian:01:a", "iqn.1993-08.org.debian:01:a"]
    disk = schema.from_dict(doc, DISK)
    assert [p.index for p in disk.paths] == [1, 2]
    assert disk.initiators == ("iqn.1993-08.org.debian:01:a",)


def test_public_dict_hides_passwords() -> None:
    d = schema.public_dict(schema.from_dict(valid(), DISK))
    assert d["chap"] == {"user": "alice", "password": "***"}
    assert SECRET not in json.dumps(d) and "mutual-Secret-42" not in json.dumps(d)
    assert SECRET not in repr(schema.from_dict(valid(), DISK))


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b[0].c`` style ``path`` in ``doc``; ``value`` ``...`` deletes it."""
    parts = path.replace("[", ".").replace("]", "").split(".")
    cur: Any = doc
    for p in parts[:-1]:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is ...:
        del cur[last]
    else:
        cur[last] = value


# (path to change, new value or ... to delete, field reported, words in the reason)
BAD: list[tuple[str, Any, str, str]] = [
    ("version", ..., "version", "missing"),
    ("version", "1", "version", "integer"),
    ("version", True, "version", "integer"),
    ("version", 2, "version", "unsupported version 2"),
    ("version", 0, "version", "unsupported"),
    ("id", ..., "id", "missing"),
    ("id", "other", "id", "does not match"),
    ("id", 7, "id", "string"),
    ("name", ..., "name", "missing"),
    ("name", "", "name", "not a valid"),
    ("name", "x" * 65, "name", "not a valid"),
    ("name", "a b", "name", "not a valid"),
    ("name", ["x"], "name", "string"),
    ("pool", "", "pool", "not a valid"),
    ("image", "a/b", "image", "not a valid"),
    ("size", -1, "size", "between"),
    ("size", 1 << 61, "size", "between"),
    ("size", 10 ** 400, "size", "between"),
    ("size", 1.5, "size", "integer"),
    ("size", "1G", "size", "integer"),
    ("iqn", ..., "iqn", "missing"),
    ("iqn", "iqn.2016-5.io.x:a", "iqn", "not a valid"),
    ("iqn", "iqn.2016-13.io.x:a", "iqn", "not a valid"),
    ("iqn", "IQN.2016-05.io.x:a", "iqn", "not a valid"),
    ("iqn", "iqn.2016-05.io.x:a b", "iqn", "not a valid"),
    ("iqn", "eui.0123456789abcde", "iqn", "not a valid"),
    ("iqn", "iqn.2016-05.io.x:" + "a" * 220, "iqn", "223"),
    ("serial", ..., "serial", "missing"),
    ("serial", "6F1E07C2-8C84-4E55-9D59-2AD1A0E5B3F1", "serial", "not a valid"),
    ("serial", "6f1e07c28c844e559d592ad1a0e5b3f1", "serial", "not a valid"),
    ("paths", ..., "paths", "non-empty list"),
    ("paths", [], "paths", "non-empty list"),
    ("paths", {"index": 1}, "paths", "non-empty list"),
    ("paths", [{"index": i, "ip": f"198.18.0.{i}", "prefix": 24} for i in range(1, 34)], "paths", "more than 32"),
    ("paths[0]", "198.18.0.1/24", "paths[0]", "object"),
    ("paths[1].index", 1, "paths[1].index", "duplicate index 1"),
    ("paths[0].index", 0, "paths[0].index", "between"),
    ("paths[0].index", "1", "paths[0].index", "integer"),
    ("paths[0].index", ..., "paths[0].index", "missing"),
    ("paths[1].ip", "198.18.0.100", "paths[1].ip", "duplicate IP"),
    ("paths[0].ip", ..., "paths[0].ip", "missing"),
    ("paths[0].ip", "198.18.0.300", "paths[0].ip", "IPv4"),
    ("paths[0].ip", "198.18.0.01", "paths[0].ip", "IPv4"),
    ("paths[0].ip", "fd00::1", "paths[0].ip", "IPv4"),
    ("paths[0].ip", "0.0.0.0", "paths[0].ip", "unicast"),
    ("paths[0].ip", "127.0.0.1", "paths[0].ip", "unicast"),
    ("paths[0].ip", "224.0.0.5", "paths[0].ip", "unicast"),
    ("paths[0].ip", "198.18.0.0", "paths[0].ip", "network address of 198.18.0.0/24"),
    ("paths[0].ip", "198.18.0.255", "paths[0].ip", "broadcast address of 198.18.0.0/24"),
    ("paths[0].ip", "255.255.255.255", "paths[0].ip", "unicast"),
    ("paths[0].ip", 3322085476, "paths[0].ip", "string"),
    ("paths[0].prefix", 33, "paths[0].prefix", "between"),
    ("paths[0].prefix", 0, "paths[0].prefix", "between"),
    ("paths[0].prefix", "24", "paths[0].prefix", "integer"),
    ("paths[0].prefix", ..., "paths[0].prefix", "missing"),
    ("paths[0].vlan", 4095, "paths[0].vlan", "between"),
    ("paths[0].role", "Storage Net", "paths[0].role", "short lowercase"),
    ("paths[0].mtu", 9000, "paths[0].mtu", "unknown field"),
    ("open", "yes", "open", "true or false"),
    ("open", True, "open", "no initiator list"),
    ("initiators", "iqn.1993-08.org.debian:01:a", "initiators", "list"),
    ("initiators", ["iqn.1993-08.org.debian:01:a", "nonsense"], "initiators[1]", "iSCSI name"),
    ("initiators", [None], "initiators[0]", "iSCSI name"),
    ("initiators", [f"iqn.1993-08.org.debian:01:{i}" for i in range(257)], "initiators", "more than 256"),
    ("chap", "alice:secret", "chap", "object"),
    ("chap.user", ..., "chap.user", "missing"),
    ("chap.user", "al ice", "chap.user", "CHAP user"),
    ("chap.user", "u" * 256, "chap.user", "CHAP user"),
    ("chap.password", "short-pw", "chap.password", "12-255"),
    ("chap.password", "p" * 256, "chap.password", "12-255"),
    ("chap.password", "has space in it", "chap.password", "12-255"),
    ("chap.password", None, "chap.password", "12-255"),
    ("chap.secret", "x" * 20, "chap.secret", "unknown field"),
    ("chap", None, "mutual_chap", "needs chap"),
    ("mutual_chap.password", 123456789012, "mutual_chap.password", "12-255"),
    ("colour", "blue", "colour", "unknown field"),
]


@pytest.mark.parametrize("path,value,field,reason", BAD, ids=[f"{b[0]}={str(b[1])[:20]}" for b in BAD])
def test_invalid_field_is_reported(path: str, value: Any, field: str, reason: str) -> None:
    doc = valid()
    _set(doc, path, value)
    e = error_of(doc)
    assert (e.disk, e.field) == (DISK, field)
    assert reason in e.reason
    assert e.disk in str(e) and field in str(e)
    assert SECRET not in str(e)


@pytest.mark.parametrize("text,reason", [
    ("", "not valid JSON"), ("{", "not valid JSON"), ("{'version': 1}", "not valid JSON"),
    ("[1, 2]", "JSON object"), ("null", "JSON object"), ("1", "JSON object"),
    ("[" * 100_000 + "]" * 100_000, "larger than"),
    ("[" * 30_000 + "]" * 30_000, "not valid JSON"),   # nesting deeper than the decoder's recursion limit
    ('{"version": 1, "name": "' + "x" * 70_000 + '"}', "larger than"),
    ('{"version": ' + "9" * 5000 + "}", "not valid JSON"),   # int longer than Python's digit limit
])
def test_unreadable_documents(text: str, reason: str) -> None:
    with pytest.raises(DefinitionError) as ei:
        schema.parse(text, DISK)
    assert ei.value.field == "(document)" and reason in ei.value.reason


def test_invalid_utf8_bytes() -> None:
    with pytest.raises(DefinitionError) as ei:
        schema.parse(b'{"version": 1, "name": "\xff"}', DISK)
    assert ei.value.field == "(document)"


def test_future_version_refused_with_clear_message() -> None:
    doc = valid()
    doc["version"] = 2
    doc["brand_new_field"] = {"x": 1}
    e = error_of(doc)
    assert e.field == "version"
    assert "unsupported version 2" in e.reason and "upgrade" in e.reason


@pytest.mark.parametrize("path,value", [
    ("iqn", f"iqn.2016-05.io.pathagent:{DISK}\n"), ("name", "vmstore\n"), ("serial", valid()["serial"] + "\n"),
    ("initiators", ["iqn.1993-08.org.debian:01:abcdef\n"]), ("chap.user", "alice\n"),
    ("chap.password", SECRET + "\n"), ("paths[1].role", "storage\n"), ("pool", "rbd\n"),
])
def test_trailing_newline_refused(path: str, value: Any) -> None:
    """A newline would end up in tgtadm/configfs arguments. ``re.match(...$)`` lets one through."""
    doc = valid()
    _set(doc, path, value)
    e = error_of(doc)
    assert e.field.split("[")[0].split(".")[0] == path.split("[")[0].split(".")[0]


# --- properties ---------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=30)
FIELD_NAMES = sorted(schema.FIELDS) + ["paths", "chap", "extra"]
field_names = st.sampled_from(FIELD_NAMES) | st.text(max_size=10)
documents = st.dictionaries(field_names, json_values, max_size=14)


def _contained(fn: Any, *args: Any) -> Disk | None:
    try:
        result = fn(*args)
    except DefinitionError as e:
        assert isinstance(e.field, str) and e.field and isinstance(e.reason, str) and e.reason
        return None
    assert isinstance(result, Disk)
    return result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | documents)
def test_any_json_value_is_a_disk_or_a_definition_error(doc: Any) -> None:
    _contained(schema.from_dict, doc, DISK)
    _contained(schema.parse, json.dumps(doc), DISK)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_any_bytes_or_text_is_a_disk_or_a_definition_error(data: bytes | str) -> None:
    _contained(schema.parse, data, DISK)


MUTABLE = ["version", "id", "name", "pool", "image", "size", "iqn", "serial", "paths", "initiators", "chap",
           "paths[0]", "paths[0].index", "paths[0].ip", "paths[0].prefix", "paths[1].vlan", "paths[1].role",
           "chap.user", "chap.password", "mutual_chap", "mutual_chap.user"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(MUTABLE), json_values)
def test_a_mutated_field_is_the_field_reported(path: str, value: Any) -> None:
    doc = valid()
    _set(doc, path, value)
    try:
        disk = schema.from_dict(doc, DISK)
    except DefinitionError as e:
        head = path.split("[")[0].split(".")[0]
        reported = e.field.split("[")[0].split(".")[0]
        # ``open`` guards the initiator list; ``mutual_chap`` needs ``chap``; a changed index or IP may
        # collide with the other path's; everything else points at the field that was changed
        allowed = {head} | ({"open"} if head == "initiators" else set()) | ({"mutual_chap"} if head == "chap" else set())
        assert reported in allowed, (path, value, e.field, e.reason)
        if head == "paths" and "[" in path:
            assert e.field.startswith("paths"), e.field
        if isinstance(value, str) and len(value) >= 4 and path.endswith("password"):
            assert value not in str(e)   # a refused password is never echoed
        return
    assert isinstance(disk, Disk)


LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
VALID_IQN = st.builds(lambda y, m, labels, unique: f"iqn.{y}-{m:02d}.{'.'.join(labels)}" + (f":{unique}" if unique else ""),
                      st.integers(1990, 2099), st.integers(1, 12), st.lists(LABEL, min_size=1, max_size=4),
                      st.text("abcdefghijklmnopqrstuvwxyz0123456789.:_-", max_size=20))
NAME = st.builds(lambda a, b: a + b, st.sampled_from("abcXYZ019"), st.text("abcXYZ019._-", max_size=20))


def _host_prefix(last: int, prefix: int) -> int:
    """``prefix``, unless 198.18.7.<last> would be its subnet's network or broadcast address (then 32)."""
    return 32 if schema.host_address_problem(ipaddress.IPv4Address(f"198.18.7.{last}"), prefix) else prefix


@st.composite
def valid_docs(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(1, 8))
    indexes = draw(st.lists(st.integers(1, 65535), min_size=n, max_size=n, unique=True))
    ips = draw(st.lists(st.integers(1, 254), min_size=n, max_size=n, unique=True))
    open_ = draw(st.booleans())
    chap = draw(st.none() | st.fixed_dictionaries({
        "user": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=40),
        "password": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=12, max_size=255)}))
    return {"version": 1, "id": DISK, "pool": "rbd", "image": f"pathagent-{DISK}", "name": draw(NAME),
            "iqn": draw(VALID_IQN), "serial": str(draw(st.uuids())), "size": draw(st.integers(0, 1 << 50)),
            "paths": [{"index": i, "ip": f"198.18.7.{ip}", "prefix": _host_prefix(ip, draw(st.integers(1, 32))),
                       "vlan": draw(st.none() | st.integers(1, 4094))} for i, ip in zip(indexes, ips)],
            "open": open_, "initiators": [] if open_ else draw(st.lists(VALID_IQN, max_size=4)), "chap": chap}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_docs())
def test_valid_documents_round_trip(doc: dict[str, Any]) -> None:
    disk = schema.from_dict(doc, DISK)
    assert schema.parse(schema.dump(disk), DISK) == disk
    assert [p.index for p in disk.paths] == sorted(p["index"] for p in doc["paths"])
    if disk.chap is not None:
        assert schema.public_dict(disk)["chap"] == {"user": disk.chap.user, "password": "***"}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_docs(), st.sampled_from(["iqn", "name", "serial"]), st.sampled_from([" ", "\t", "\x00", "\r"]))
def test_whitespace_is_never_accepted_in_names(doc: dict[str, Any], field: str, ws: str) -> None:
    doc = copy.deepcopy(doc)
    doc[field] = doc[field] + ws
    with pytest.raises(DefinitionError) as ei:
        schema.from_dict(doc, DISK)
    assert ei.value.field == field
