"""The ``rbd`` catalog and ``agent.adapters.ceph`` against a real micro Ceph cluster: definitions read from RBD image
metadata, validated, cached by (disk, version) and re-read after ``refresh``; corrupt documents reported
with the disk and the field; a deleted image, a missing pool and unreachable monitors reported as
``CatalogUnavailable`` naming the disk, in bounded time, and recovery when Ceph is back."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

import pytest
import rbd

from agent import plugins
from agent.config import CephConfig
from agent.core import schema
from agent.backend import PluginContext
from agent.adapters.ceph import (KRBD_FEATURES, CephClient, CephError, CephUnavailable, ImageExists, ImageNotFound,
                        PoolNotFound)
from agent.errors import CatalogUnavailable, DefinitionError
from agent.adapters.rbd_catalog import RETRY_MIN, RbdCatalog
from lab.ceph import MicroCeph

pytestmark = pytest.mark.ceph

TIMEOUT = 2.0


def document(disk_id: str, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1, "id": disk_id, "name": f"disk-{disk_id}", "pool": "rbd", "image": f"pathagent-{disk_id}",
        "size": 1 << 20, "iqn": f"iqn.2016-05.io.pathagent:{disk_id}", "serial": str(uuid.uuid4()),
        "paths": [{"index": 1, "ip": "198.18.0.10", "prefix": 24}, {"index": 2, "ip": "198.18.1.10", "prefix": 24}],
        "open": False, "initiators": ["iqn.1993-08.org.debian:01:host1"],
        "chap": {"user": "alice", "password": "catalog-secret-1"}, "mutual_chap": None}
    doc.update(changes)
    return doc


class Images:
    """Writes test images and their metadata through ``agent.adapters.ceph`` (what the CLI does)."""

    def __init__(self, ceph: MicroCeph) -> None:
        self.client = CephClient(ceph.conf_path, "admin", 5.0)
        self.n = 0

    def new(self, doc: dict[str, Any] | str | None = None, pool: str = "rbd") -> tuple[str, str]:
        self.n += 1
        disk_id = f"t{self.n:03d}{uuid.uuid4().hex[:4]}"
        image = f"pathagent-{disk_id}"
        self.client.create_image(pool, image, 1 << 20)
        if doc is not None:
            self.write(pool, image, doc if isinstance(doc, str) else json.dumps(doc))
        return disk_id, image

    def write(self, pool: str, image: str, text: str) -> None:
        self.client.set_meta(pool, image, schema.META_KEY, text)


def catalog_for(ceph: MicroCeph, refresh: float = 30.0, timeout: float = TIMEOUT) -> RbdCatalog:
    ctx = PluginContext(node="n1", state_dir="/nonexistent",
                        ceph=CephConfig(conf=ceph.conf_path, client_id="admin", refresh=refresh, timeout=timeout))
    cat = plugins.load_catalog("rbd", ctx)   # through the entry point, as the agent loads it
    assert isinstance(cat, RbdCatalog)
    return cat


@pytest.fixture(scope="module")
def images(micro_ceph: MicroCeph) -> Iterator[Images]:
    imgs = Images(micro_ceph)
    yield imgs
    imgs.client.close()


@pytest.fixture
def catalog(micro_ceph: MicroCeph) -> Iterator[RbdCatalog]:
    cat = catalog_for(micro_ceph)
    yield cat
    cat.close()


def test_reads_and_validates_a_definition(images: Images, catalog: RbdCatalog) -> None:
    disk_id, image = images.new()
    doc = document(disk_id)
    images.write("rbd", image, json.dumps(doc))
    disk = catalog.get(disk_id, "rbd", image, 7)
    assert disk == schema.from_dict(doc, disk_id)
    assert (disk.pool, disk.image, disk.serial) == ("rbd", image, doc["serial"])
    assert [p.ip for p in disk.paths] == ["198.18.0.10", "198.18.1.10"]


def test_location_comes_from_the_record_not_the_document(images: Images, catalog: RbdCatalog) -> None:
    disk_id, image = images.new()
    images.write("rbd", image, json.dumps(document(disk_id, pool="elsewhere", image="copied-from")))
    disk = catalog.get(disk_id, "rbd", image, 1)
    assert (disk.pool, disk.image) == ("rbd", image)


def test_cache_by_version_and_refresh(micro_ceph: MicroCeph, images: Images) -> None:
    cat = catalog_for(micro_ceph, refresh=1.0)
    try:
        disk_id, image = images.new()
        images.write("rbd", image, json.dumps(document(disk_id, name="first")))
        assert cat.get(disk_id, "rbd", image, 10).name == "first"
        # edited by another tool: the cached entry is used until refresh ...
        images.write("rbd", image, json.dumps(document(disk_id, name="second")))
        assert cat.get(disk_id, "rbd", image, 10).name == "first"
        # ... but a new version (the CLI touched the disk key) is read at once
        assert cat.get(disk_id, "rbd", image, 11).name == "second"
        images.write("rbd", image, json.dumps(document(disk_id, name="third")))
        deadline = time.monotonic() + 3.0
        while cat.get(disk_id, "rbd", image, 11).name != "third":
            assert time.monotonic() < deadline, "edit not picked up within refresh"
            time.sleep(0.1)
    finally:
        cat.close()


def test_warm_reads_do_not_touch_ceph(micro_ceph: MicroCeph, images: Images, catalog: RbdCatalog) -> None:
    disk_id, image = images.new()
    images.write("rbd", image, json.dumps(document(disk_id)))
    catalog.get(disk_id, "rbd", image, 3)
    micro_ceph.freeze()
    try:
        t = time.monotonic()
        for _ in range(100):
            catalog.get(disk_id, "rbd", image, 3)
        assert time.monotonic() - t < 0.5
    finally:
        micro_ceph.thaw()


CORRUPT: list[tuple[str, Any, str]] = [
    ("bad-json", '{"version": 1, "id": ', "(document)"),
    ("not-an-object", "[1, 2, 3]", "(document)"),
    ("missing-field", lambda d: {k: v for k, v in d.items() if k != "serial"}, "serial"),
    ("bad-ip", lambda d: {**d, "paths": [{"index": 1, "ip": "198.18.0.999", "prefix": 24}]}, "paths[0].ip"),
    ("wrong-type", lambda d: {**d, "size": "1G"}, "size"),
    ("huge-value", lambda d: {**d, "size": 10 ** 30}, "size"),
    ("huge-document", lambda d: {**d, "name": "x" * 100_000}, "(document)"),
    ("unknown-version", lambda d: {**d, "version": 2}, "version"),
    ("duplicate-index", lambda d: {**d, "paths": [{"index": 1, "ip": "198.18.0.1", "prefix": 24},
                                                  {"index": 1, "ip": "198.18.0.2", "prefix": 24}]}, "paths[1].index"),
    ("short-chap", lambda d: {**d, "chap": {"user": "u", "password": "short"}}, "chap.password"),
    ("wrong-id", lambda d: {**d, "id": "someone-else"}, "id"),
]


@pytest.mark.parametrize("kind,corrupt,field", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_definition_reported_with_disk_and_field(images: Images, catalog: RbdCatalog, kind: str,
                                                         corrupt: Any, field: str) -> None:
    good_id, good_image = images.new()
    images.write("rbd", good_image, json.dumps(document(good_id)))
    disk_id, image = images.new()
    text = corrupt if isinstance(corrupt, str) else json.dumps(corrupt(document(disk_id)))
    images.write("rbd", image, text)
    with pytest.raises(DefinitionError) as ei:
        catalog.get(disk_id, "rbd", image, 1)
    e = ei.value
    assert (e.disk, e.field) == (disk_id, field)
    assert disk_id in str(e) and field in str(e)
    assert "catalog-secret-1" not in str(e) and "short" not in e.reason
    # the error is remembered (no re-read until the version changes or refresh passes) ...
    with pytest.raises(DefinitionError) as again:
        catalog.get(disk_id, "rbd", image, 1)
    assert again.value is e
    # ... the other disks are unaffected, and a repaired document is read at the next version
    assert catalog.get(good_id, "rbd", good_image, 1).id == good_id
    images.write("rbd", image, json.dumps(document(disk_id)))
    assert catalog.get(disk_id, "rbd", image, 2).id == disk_id


def test_image_without_definition(images: Images, catalog: RbdCatalog) -> None:
    disk_id, image = images.new(doc=None)
    with pytest.raises(DefinitionError) as ei:
        catalog.get(disk_id, "rbd", image, 1)
    assert ei.value.field == "(document)" and schema.META_KEY in ei.value.reason


def test_image_deleted_under_a_started_disk(micro_ceph: MicroCeph, images: Images) -> None:
    cat = catalog_for(micro_ceph, refresh=1.0)
    try:
        disk_id, image = images.new()
        images.write("rbd", image, json.dumps(document(disk_id)))
        cat.get(disk_id, "rbd", image, 5)
        images.client.remove_image("rbd", image)
        time.sleep(1.05)  # past refresh: the entry is read again
        with pytest.raises(CatalogUnavailable) as ei:
            cat.get(disk_id, "rbd", image, 5)
        assert ei.value.disk == disk_id
        assert disk_id in str(ei.value) and f"rbd/{image}" in str(ei.value) and "does not exist" in str(ei.value)
    finally:
        cat.close()


def test_pool_missing(images: Images, catalog: RbdCatalog) -> None:
    t = time.monotonic()
    with pytest.raises(CatalogUnavailable) as ei:
        catalog.get("d1", "no-such-pool", "pathagent-d1", 1)
    assert time.monotonic() - t < TIMEOUT
    assert ei.value.disk == "d1" and "pool no-such-pool does not exist" in str(ei.value)


def test_monitors_unreachable_then_recovery(own_ceph: MicroCeph) -> None:
    imgs = Images(own_ceph)
    cat = catalog_for(own_ceph, refresh=1.0, timeout=TIMEOUT)
    try:
        ids = [imgs.new() for _ in range(3)]
        for disk_id, image in ids:
            imgs.write("rbd", image, json.dumps(document(disk_id)))
            cat.get(disk_id, "rbd", image, 1)
        time.sleep(1.5)  # the cache is stale (refresh 1 s): every get needs Ceph
        own_ceph.freeze()
        t = time.monotonic()
        with pytest.raises(CatalogUnavailable) as ei:
            cat.get(ids[0][0], "rbd", ids[0][1], 1)
        took = time.monotonic() - t
        assert ei.value.disk == ids[0][0] and "timed out" in str(ei.value)
        assert took < TIMEOUT + 1.5, took
        # the outage is remembered: the other disks fail at once instead of waiting one timeout each
        t = time.monotonic()
        for disk_id, image in ids[1:]:
            with pytest.raises(CatalogUnavailable) as ei:
                cat.get(disk_id, "rbd", image, 1)
            assert ei.value.disk == disk_id and "Ceph unavailable" in str(ei.value)
        assert time.monotonic() - t < 0.1
        own_ceph.thaw()
        t = time.monotonic()
        while True:  # recovers on its own (retry after RETRY_MIN), with the same handle
            try:
                assert cat.get(ids[1][0], "rbd", ids[1][1], 1).id == ids[1][0]
                break
            except CatalogUnavailable:
                assert time.monotonic() - t < RETRY_MIN + TIMEOUT + 1.0
                time.sleep(0.1)
        for disk_id, image in ids:
            assert cat.get(disk_id, "rbd", image, 1).id == disk_id
    finally:
        own_ceph.thaw()
        cat.close()
        imgs.client.close()


def test_a_missing_pool_while_monitors_are_down_is_bounded(own_ceph: MicroCeph) -> None:
    """librados waits for the newest OSD map without any timeout when asked for an unknown pool."""
    client = CephClient(own_ceph.conf_path, "admin", 1.0)
    try:
        client.list_images("rbd")
        own_ceph.freeze()
        t = time.monotonic()
        with pytest.raises(CephUnavailable):
            client.list_images("not-a-pool")
        assert time.monotonic() - t < 1.0 + 1.5
        own_ceph.thaw()
        with pytest.raises(PoolNotFound):
            client.list_images("not-a-pool")
    finally:
        own_ceph.thaw()
        client.close()


def test_unreachable_monitors_at_connect(tmp_path: Any, micro_ceph: MicroCeph) -> None:
    conf = tmp_path / "ceph.conf"  # monitors on a port where nothing listens
    conf.write_text("[global]\nmon host = [v2:127.0.0.1:9,v1:127.0.0.1:10]\nauth client required = none\n")
    ctx = PluginContext(node="n1", state_dir=str(tmp_path), ceph=CephConfig(conf=str(conf), refresh=5, timeout=1.0))
    cat = RbdCatalog(ctx)
    try:
        t = time.monotonic()
        with pytest.raises(CatalogUnavailable) as ei:
            cat.get("d9", "rbd", "pathagent-d9", 1)
        assert time.monotonic() - t < 1.0 + 1.5
        assert ei.value.disk == "d9" and "cannot reach the monitors" in str(ei.value)
    finally:
        cat.close()
    with pytest.raises(CephError, match="no such file"):
        CephClient(str(tmp_path / "missing.conf")).list_pools()


def test_ceph_client_images(micro_ceph: MicroCeph, images: Images) -> None:
    c = images.client
    name = f"cc-{uuid.uuid4().hex[:6]}"
    c.create_image("rbd", name, 4 << 20)
    with pytest.raises(ImageExists):
        c.create_image("rbd", name, 4 << 20)
    assert name in c.list_images("rbd") and c.image_exists("rbd", name) and c.image_size("rbd", name) == 4 << 20
    import rados
    r = rados.Rados(conffile=micro_ceph.conf_path)
    r.connect(timeout=5)
    try:
        with r.open_ioctx("rbd") as io, rbd.Image(io, name, read_only=True) as img:
            assert img.features() == KRBD_FEATURES == rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
    finally:
        r.shutdown()
    assert c.get_meta("rbd", name, "k") is None
    c.set_meta("rbd", name, "k", "v")
    assert c.get_meta("rbd", name, "k") == "v"
    c.remove_meta("rbd", name, "k")
    c.remove_meta("rbd", name, "k")
    assert c.get_meta("rbd", name, "k") is None
    c.remove_image("rbd", name)
    assert not c.image_exists("rbd", name)
    with pytest.raises(ImageNotFound):
        c.get_meta("rbd", name, "k")
    with pytest.raises(ImageNotFound):
        c.remove_image("rbd", name)
