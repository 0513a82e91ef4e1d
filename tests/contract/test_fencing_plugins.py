"""The fencing plugins load through ``agent.plugins.load_fencing`` (the ``pathagent.fencing`` entry points) and
keep the ``Fencing`` ABC's promises that need no cluster: built without touching the world, options checked
with every bad key named, errors typed. Behaviour against real Ceph: tests/ceph/test_fencing_ceph.py."""
from __future__ import annotations

import dataclasses

import pytest

from agent import plugins
from agent.backend import FailedNode, Fencing, PluginContext
from agent.config import CephConfig
from agent.errors import ConfigError, PermanentBackendError, TransientBackendError

NOWHERE = CephConfig(conf="/nonexistent/ceph.conf", client_id="admin", timeout=1.0)


def ctx(node: str = "gwa", ceph: CephConfig = NOWHERE, **options: object) -> PluginContext:
    return PluginContext(node=node, state_dir="/nonexistent", options=options, ceph=ceph)


def test_both_built_ins_are_registered() -> None:
    assert {"ceph-blocklist", "none"} <= set(plugins.available("fencing"))


def test_none_loads_and_fences_nothing() -> None:
    f = plugins.load_fencing("none", ctx())
    assert isinstance(f, Fencing) and f.required is False
    assert f.identity() == {}
    assert "nothing to do for gwb" in f.fence(FailedNode("gwb", "s1"))
    f.close()


@pytest.fixture
def bindings() -> None:
    pytest.importorskip("rados", reason="python3-rados missing: ceph-blocklist cannot load")
    pytest.importorskip("rbd", reason="python3-rbd missing: ceph-blocklist cannot load")


@pytest.mark.usefixtures("bindings")
def test_ceph_blocklist_loads_without_touching_the_world() -> None:
    f = plugins.load_fencing("ceph-blocklist", ctx(expire=600, parallel=8))   # the conf does not even exist
    assert isinstance(f, Fencing) and f.required is True
    assert {"expire", "parallel"} <= set(f.config_keys)
    with pytest.raises(TransientBackendError, match="gwa"):
        f.identity()                                                         # Ceph is needed only now
    with pytest.raises(TransientBackendError, match="fence gwb"):
        f.fence(FailedNode("gwb", "s1", identity={"entity": "client.pathagent-gwb", "ips": ["10.0.0.2"]},
                           images=(("rbd", "img"),)))
    f.close()


@pytest.mark.usefixtures("bindings")
def test_ceph_blocklist_names_every_bad_option() -> None:
    with pytest.raises(ConfigError) as e:
        plugins.load_fencing("ceph-blocklist", ctx(expire=5, parallel=True, typo=1))
    keys = {k for k, _ in e.value.problems}
    assert keys == {"fencing.ceph-blocklist.expire", "fencing.ceph-blocklist.parallel",
                    "fencing.ceph-blocklist.typo"}


@pytest.mark.usefixtures("bindings")
def test_ceph_blocklist_refuses_what_it_cannot_attribute() -> None:
    f = plugins.load_fencing("ceph-blocklist", ctx(node=""))
    with pytest.raises(TransientBackendError, match="not known"):
        f.identity()
    late = plugins.load_fencing("ceph-blocklist", dataclasses.replace(ctx(node=""), node_name=lambda: "gwc"))
    with pytest.raises(PermanentBackendError, match="own Ceph client"):   # the name learnt later counts
        late.fence(FailedNode("gwb", "s1", identity={"entity": "client.pathagent-gwc"}))
    shared = CephConfig(conf=NOWHERE.conf, client_id="admin", data_client_id="gateway")   # no {node}
    g = plugins.load_fencing("ceph-blocklist", ctx(ceph=shared))
    with pytest.raises(PermanentBackendError, match="no identity"):
        g.fence(FailedNode("gwb", "s1"))
    with pytest.raises(PermanentBackendError, match="own Ceph client"):
        f.fence(FailedNode("gwb", "s1", identity={"entity": "client.admin"}))
    for p in (f, g, late):
        p.close()


def test_tgt_opens_images_as_the_nodes_own_client() -> None:
    from plugins.tgt.backend import TgtBackend
    ceph = CephConfig(conf="/etc/ceph/ceph.conf", client_id="admin")
    assert TgtBackend(ctx(node="gwa", ceph=ceph)).settings.bsopts == "conf=/etc/ceph/ceph.conf;id=pathagent-gwa"
    assert TgtBackend(ctx(node="", ceph=ceph)).settings.bsopts == "conf=/etc/ceph/ceph.conf;id=admin"
    later = TgtBackend(dataclasses.replace(ctx(node="", ceph=ceph), node_name=lambda: "gwb"))   # from Consul
    assert later._settings_now().bsopts == "conf=/etc/ceph/ceph.conf;id=pathagent-gwb"
    with pytest.raises(ConfigError, match="without ';'"):
        TgtBackend(ctx(node="gwa", ceph=CephConfig(data_client_id="gw;{node}")))
