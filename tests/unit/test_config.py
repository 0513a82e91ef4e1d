from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FAKE = {"target": {"backend": "fake"}, "network": {"backend": "none"}, "catalog": {"backend": "fake"}}


def problems(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        config.parse(data)
    return e.value.problems


def test_defaults_satisfy_the_fencing_inequality() -> None:
    c = config.parse(FAKE)                      # no Ceph-side fence: the whole fence is the serving bound
    assert c.fencing.backend == "none" and c.consul.fence_after + c.stop_time < c.consul.lock_delay
    assert c.consul.fence_after > c.consul.election_stall + c.consul.confirm_interval + config.PET_BUDGET
    r = config.parse({})                         # RBD disks, ceph-blocklist: the addresses are the bound
    assert r.fencing.backend == "ceph-blocklist" and config.serving_bound(r) == (r.down_time, "network.down_time")
    assert r.consul.fence_after + r.down_time < r.consul.lock_delay
    assert c.watchdog.backend == "guard" and c.consul.agent_check_ttl > 0 and c.consul.session_ttl > 0
    assert (c.consul.prefix, c.consul.session_name, c.port) == ("pathagent", "iSCSITarget", 3260)


def test_every_problem_is_listed_with_its_key() -> None:
    found = dict(problems({**FAKE, "consul": {"lock_delay": "8", "bogus": 1, "address": "nohost"},
                           "ceph": {"refresh": -1}, "extra": {}}))
    assert set(found) == {"consul.lock_delay", "consul.bogus", "consul.address", "ceph.refresh", "extra"}
    assert "unknown key" in found["consul.bogus"]


def test_fencing_inequality_refused() -> None:
    found = dict(problems({**FAKE, "consul": {"fence_after": 9, "lock_delay": 5}}))
    assert "consul.fence_after" in found and "lock_delay" in found["consul.fence_after"]
    found = dict(problems({**FAKE, "consul": {"fence_after": 5.0}}))
    assert "election" in found["consul.fence_after"], "election 4.5 + interval 0.25 + pet 0.25 = 5"
    config.parse({**FAKE, "consul": {"fence_after": 5.05}})     # just above; 5.05 + stop_time 0.5 < lock_delay 6
    found = dict(problems({**FAKE, "consul": {"fence_after": 5.6}}))
    assert "target.stop_time" in found["consul.fence_after"], "5.6 + stop_time 0.5 is not below lock_delay 6"
    config.parse({"consul": {"fence_after": 5.6}})              # with ceph-blocklist: 5.6 + down_time 0.25 < 6
    found = dict(problems({"consul": {"fence_after": 5.8}}))
    assert "network.down_time" in found["consul.fence_after"], "5.8 + down_time 0.25 is not below lock_delay 6"


@pytest.mark.parametrize("key", ["agent_check_ttl", "session_ttl"])
def test_liveness_that_hands_paths_over_needs_a_watchdog(key: str) -> None:
    found = dict(problems({**FAKE, "watchdog": {"backend": "none"}}))
    assert f"consul.{key}" in found and "watchdog" in found[f"consul.{key}"]
    config.parse({**FAKE, "watchdog": {"backend": "none"}, "consul": {"agent_check_ttl": 0, "session_ttl": 0}})


def test_device_watchdog_timeout_must_fit_before_the_deadline() -> None:
    found = dict(problems({**FAKE, "watchdog": {"backend": "device", "device": {"timeout": 4.5}}}))
    assert "watchdog.device.timeout" in found, "4.5 is not below fence_after 5.25 - interval 0.25 - timeout 0.5"
    config.parse({**FAKE, "watchdog": {"backend": "device", "device": {"timeout": 4}}})


def test_unknown_plugin_and_plugin_keys() -> None:
    found = dict(problems({"target": {"backend": "nope", "fake": {"fail": [], "typo": 1}},
                           "network": {"backend": "none"}, "catalog": {"backend": "fake"}}))
    assert "available:" in found["target.backend"] and "fake" in found["target.backend"]
    assert "target.fake.typo" in found


def test_token_never_in_repr() -> None:
    c = config.parse({**FAKE, "consul": {"token": "s3cr3t-token-value"}})
    assert "s3cr3t" not in repr(c)


def test_sample_config_documents_every_key() -> None:
    text = (REPO / "etc" / "pathagent.toml").read_text()
    for table, keys in config.SCHEMA.items():
        assert f"[{table}]" in text, table
        for k in keys:
            assert f"\n{k} =" in text or f"\n# {k} =" in text, f"{table}.{k} undocumented"


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[consul]\nlock_delay = "x"\nnope = 1\n[target]\nbackend = "fake"\n')
    exe = [sys.executable, "-m", "agent.cli"]
    r = subprocess.run([*exe, "check-config", "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout.splitlines() == [f"{bad}: [consul] lock_delay: must be a number of seconds, not str",
                                     f"{bad}: [consul] nope: unknown key"]
    good = tmp_path / "good.toml"
    good.write_text('[target]\nbackend = "fake"\n[network]\nbackend = "none"\n[catalog]\nbackend = "fake"\n')
    r = subprocess.run([*exe, "--config", str(good), "check-config", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"ok": true' in r.stdout


def test_sample_config_documents_every_plugin_key() -> None:
    from agent import plugins
    text = (REPO / "etc" / "pathagent.toml").read_text()
    for kind in config.PLUGIN_TABLES:
        for name in plugins.available(kind):
            for k in getattr(plugins.plugin_class(kind, name), "config_keys", {}):
                assert f"# {k} =" in text, f"{kind}.{name}.{k} undocumented in etc/pathagent.toml"


def test_ceph_side_fencing_is_the_default_with_rbd_disks_only() -> None:
    assert config.parse({}).fencing.backend == "ceph-blocklist"
    assert config.parse(FAKE).fencing.backend == "none"
    assert config.parse({**FAKE, "fencing": {"backend": "none"}}).fencing.backend == "none"


def test_ceph_blocklist_needs_a_data_client_name_per_node() -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"ceph": {"data_client_id": "gateways"}})
    assert any(k == "ceph.data_client_id" and "{node}" in m for k, m in e.value.problems)
    assert config.parse({"ceph": {"data_client_id": "gw-{node}"}}).ceph.data_id("a") == "gw-a"


@pytest.mark.parametrize("key, shown", [
    ("consul.lock_delay", "[consul] lock_delay"), ("target.tgt.io_threads", "[target.tgt] io_threads"),
    ("target.backend", "[target] backend"), ("target.fake", "[target.fake]"), ("extra", "[extra]"),
    ("fencing.ceph-blocklist.expire", "[fencing.ceph-blocklist] expire"),
    ("network.iproute.interfaces.10.0.0.0/24", "[network.iproute] interfaces.10.0.0.0/24"), ("(file)", "(file)")])
def test_problems_name_the_table_and_key_as_the_file_spells_them(key: str, shown: str) -> None:
    assert config.show_key(key) == shown


def test_examine_reports_every_problem_and_still_gives_a_config() -> None:
    cfg, found = config.examine({**FAKE, "consul": {"lock_delay": "x"}, "target": {"backend": "fake", "port": 0}})
    assert {k for k, _ in found} == {"consul.lock_delay", "target.port"}
    assert cfg.consul.lock_delay == config.ConsulConfig.lock_delay and cfg.port == 3260, "bad values: defaults"
    assert cfg.target.backend == "fake"


def test_plugin_option_problems_are_those_run_meets(tmp_path: Path) -> None:
    from agent import plugins
    cfg = config.parse({**FAKE, "state": {"dir": str(tmp_path)},
                        "target": {"backend": "fake", "fake": {"export_delay": -1, "fail": "x"}},
                        "network": {"backend": "iproute", "iproute": {"label": "a b", "promote_secondaries": 1}}})
    found = plugins.option_problems(cfg)
    assert {k for k, _ in found} == {"target.fake.export_delay", "target.fake.fail", "network.iproute.label",
                                     "network.iproute.promote_secondaries"}
    with pytest.raises(ConfigError) as e:          # what `run` does with the first of them
        plugins.load_target(cfg.target.backend, plugins.context(cfg, "target"))
    assert set(e.value.problems) <= set(found)
    assert plugins.option_problems(config.parse({**FAKE, "state": {"dir": str(tmp_path)}})) == []
    assert list(tmp_path.iterdir()) == [], "checking touches nothing"


@pytest.mark.parametrize("raw, where", [(b'[consul]\naddress = "\xff\xfe"\n', "line 2, column 12"),
                                        (b"\xef\xbb\xbf\x80", "line 1, column 4")])
def test_bytes_that_are_not_utf8_are_one_problem_with_line_and_column(tmp_path: Path, raw: bytes, where: str) -> None:
    f = tmp_path / "c.toml"
    f.write_bytes(raw)
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    [(key, msg)] = e.value.problems
    assert key == "(file)" and msg.startswith(f"{f}: not UTF-8: ") and where in msg and "\n" not in msg


def test_lio_fence_timeout_must_fit_the_stop_time() -> None:
    lio = {**FAKE, "target": {"backend": "lio"}}
    config.parse(lio)                                   # default 0.25 + down_time 0.25 <= stop_time 0.5
    found = dict(problems({**lio, "target": {"backend": "lio", "lio": {"fence_timeout": 0.3}}}))
    assert "target.lio.fence_timeout" in found and "target.stop_time" in found["target.lio.fence_timeout"]
    config.parse({**lio, "target": {"backend": "lio", "stop_time": 0.6, "lio": {"fence_timeout": 0.3}}})
    config.parse({**FAKE, "target": {"backend": "fake", "lio": {"fence_timeout": 9}}})   # not the backend
