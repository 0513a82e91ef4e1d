"""The ``guard`` watchdog with real processes: the guard fences the fake target and network backends
(their JSON state files, from another process) when the agent stops petting it, and only then.

No root. The tests at the end run a real Consul (``lab.consul``; skipped with the reason when its binary
is missing): the guard confirms the agent's session by itself while nobody pets it, and fences at its
deadline once it cannot (the session destroyed, the Consul agent stopped or frozen, a slow Consul). Each test has its own state directory and config file; the ``GuardWatchdog`` clients
play the agent process (a client dropped without ``disarm`` is an agent that crashed or restarted). Every
guard a test leaves behind is killed at teardown, by the pid in its lock file after checking its command
line names this state directory.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from agent import config, plugins, statefile
from agent.errors import PermanentBackendError, TransientBackendError
from plugins.guard import GuardWatchdog, protocol, read_events, shared

pytestmark = pytest.mark.timeout(60)

#: how late the guard may fence after the deadline and still pass (measured: well under 5 ms)
MAX_LAG = 0.25


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    until = now() + timeout
    while now() < until:
        if cond():
            return True
        time.sleep(step)
    return cond()


def alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here reaps orphans late; a zombie passes ``kill -0``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class Node:
    """One node: a state dir with pre-filled fake exports and addresses, and the config file."""

    def __init__(self, root: Path, consul: str = "") -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir(mode=0o700, parents=True)
        self.config = root / "pathagent.toml"
        self.targets = self.state / "fake-targets.json"
        self.clients: list[GuardWatchdog] = []
        self.consul = consul                 # the [consul] table's body
        self.write_config()

    def write_config(self, target_file: Path | None = None, comment: str = "") -> None:
        extra = f'\n[target.fake]\nfile = "{target_file}"\n' if target_file else ""
        self.config.write_text(f"""# {comment}
[consul]
{self.consul}
[state]
dir = "{self.state}"
[target]
backend = "fake"
[network]
backend = "fake"
[catalog]
backend = "fake"
[watchdog]
backend = "guard"
{extra}""")
        if target_file:
            self.targets = target_file

    def fill(self, targets: Path | None = None) -> None:
        """Two exported paths and their addresses, as an agent would have left them."""
        statefile.write(str(targets or self.targets), {"paths": {"d1/1": {"iqn": "iqn.x:d1", "tpg": 1},
                                                                 "d2/1": {"iqn": "iqn.x:d2", "tpg": 1}},
                                                       "fences": 0})
        statefile.write(str(self.state / "fake-addresses.json"),
                        {"addresses": {"d1/1": "192.0.2.1/24", "d2/1": "192.0.2.2/24"}})

    def exports(self, targets: Path | None = None) -> dict[str, Any]:
        return dict(json.loads((targets or self.targets).read_text()))

    def addresses(self) -> dict[str, Any]:
        return dict(json.loads((self.state / "fake-addresses.json").read_text())["addresses"])

    def serving(self, targets: Path | None = None) -> bool:
        paths = self.exports(targets)["paths"]
        addrs = self.addresses()
        # the guard takes the addresses down first: never an address up on a fenced target
        assert paths or not addrs, f"target fenced before the network: {addrs} still up"
        return bool(paths or addrs)

    def client(self) -> GuardWatchdog:
        """A new agent process's watchdog, built the way the agent builds it."""
        cfg = config.load(str(self.config))
        w = plugins.load_watchdog(cfg.watchdog.backend, plugins.context(cfg, "watchdog"))
        assert isinstance(w, GuardWatchdog)
        self.clients.append(w)
        return w

    def guard_pids(self) -> dict[str, int]:
        """{config hash: pid} of every guard holding its lock in this state dir."""
        out = {}
        for name in os.listdir(self.state):
            if name.startswith("guard-") and name.endswith(".lock"):
                h = name[len("guard-"):-len(".lock")]
                pid = protocol.lock_holder(str(self.state), h)
                if pid:
                    out[h] = pid
        return out

    def ours(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return False
        return b"plugins.guard" in argv and str(self.state).encode() in argv

    def cleanup(self) -> None:
        for w in self.clients:
            try:
                w.disarm()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        for pid in self.guard_pids().values():
            if self.ours(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not self.guard_pids(), 5), self.guard_pids()
        remove_shared_pages(self.state)

    def log(self) -> str:
        try:
            return (self.state / protocol.LOG).read_text()
        except OSError:
            return ""


def remove_shared_pages(state: Path) -> None:
    """The /dev/shm pages of this state dir's guards (a SIGKILLed guard leaves its page behind)."""
    for name in os.listdir(state):
        if name.startswith("guard-") and name.endswith(".lock"):
            try:
                os.unlink(shared.path(str(state), name[len("guard-"):-len(".lock")]))
            except FileNotFoundError:
                pass


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    n.fill()
    try:
        yield n
    finally:
        n.cleanup()
        print(n.log())


def fence_time(n: Node, deadline: float, targets: Path | None = None) -> float:
    """Watch the state files until they are emptied; assert they were full until the deadline. Returns
    the first time (CLOCK_BOOTTIME) they were seen empty."""
    while now() < deadline - 0.02:
        assert n.serving(targets), f"fenced {deadline - now():.3f}s before the deadline"
        time.sleep(0.005)
    assert wait_for(lambda: not n.serving(targets), 2 + MAX_LAG, 0.001), "no fence"
    return now()


def events(n: Node, count: int) -> dict[str, Any]:
    """The fence events once ``count`` are recorded (the guard writes them right after fencing)."""
    assert wait_for(lambda: read_events(str(n.state))["count"] >= count, 1), read_events(str(n.state))
    ev = read_events(str(n.state))
    assert ev["count"] == count, ev
    return ev


def test_fences_at_the_deadline(node: Node) -> None:
    w = node.client()
    t0 = now()
    d = now() + 1.0
    w.pet(d)
    first_pet = now() - t0
    st = w.status()
    assert st is not None and st["state"] == "armed" and abs(st["deadline"] - d) < 1e-6
    pid = st["pid"]
    assert os.getsid(pid) == pid, "the guard runs in its own session"
    seen = fence_time(node, d)
    ev = events(node, 1)
    last = ev["last"]
    assert last["start"] >= d and 0 <= last["lag"] < MAX_LAG
    assert last["network_error"] == last["target_error"] == ""
    assert node.exports()["fences"] == 1
    print(f"\nfirst pet (starts the guard) {first_pet * 1e3:.1f} ms; fence lag {last['lag'] * 1e3:.2f} ms "
          f"after the deadline, duration {last['duration'] * 1e3:.2f} ms (network "
          f"{last['network_duration'] * 1e3:.2f} ms, target {last['target_duration'] * 1e3:.2f} ms); "
          f"seen by the test {(seen - d) * 1e3:.1f} ms after the deadline")
    # it stays, disarmed, until pet again; a pet re-arms it
    st = w.status()
    assert st is not None and st["state"] == "fenced" and st["deadline"] is None and st["pid"] == pid
    node.fill()
    time.sleep(0.3)
    assert node.serving() and read_events(str(node.state))["count"] == 1
    d = now() + 0.5
    w.pet(d)
    fence_time(node, d)
    events(node, 2)


def test_petting_keeps_it_quiet_and_disarm_ends_it(node: Node) -> None:
    w = node.client()
    t_pet: list[float] = []
    end = now() + 2.0
    while now() < end:
        t = now()
        w.pet(now() + 0.6)
        t_pet.append(now() - t)
        time.sleep(0.2)
    assert node.serving() and read_events(str(node.state))["count"] == 0
    st = w.status()
    assert st is not None
    pid = st["pid"]
    print(f"\npet round trip: median {sorted(t_pet)[len(t_pet) // 2] * 1e3:.2f} ms, max after the first "
          f"{max(t_pet[1:]) * 1e3:.2f} ms")
    w.disarm()
    assert wait_for(lambda: not alive(pid), 2)
    assert not (node.state / protocol.sock_name(w.config_hash)).exists()
    assert not node.guard_pids()
    time.sleep(0.8)                    # past the last deadline
    assert node.serving() and read_events(str(node.state))["count"] == 0
    assert w.status() is None
    w.disarm()                         # nothing runs: nothing to do


def test_closed_client_still_fences_unless_a_new_one_pets(node: Node) -> None:
    # an agent that crashed (or detached) after its last pet: the deadline stands
    w1 = node.client()
    d = now() + 1.0
    w1.pet(d)
    pid = w1.pid
    w1.close()
    del w1
    fence_time(node, d)
    events(node, 1)

    # a planned restart: the next process pets the same guard before the deadline: no fence
    node.fill()
    w2 = node.client()
    d = now() + 1.0
    w2.pet(d)
    assert w2.pid == pid
    w2.close()
    w3 = node.client()
    end = d + 1.0
    while now() < end:
        w3.pet(now() + 0.5)
        time.sleep(0.1)
    assert w3.pid == pid, "the new client took over the same guard"
    assert node.serving() and read_events(str(node.state))["count"] == 1
    w3.close()                         # and then that one dies too
    st = w3.status()
    assert st is not None
    fence_time(node, st["deadline"])
    events(node, 2)


def test_a_killed_guard_is_restarted_by_the_next_pet(node: Node) -> None:
    w = node.client()
    w.pet(now() + 2.0)
    pid = w.pid
    assert pid is not None and node.ours(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not node.guard_pids(), 2)
    reap(pid)
    w.pet(now() + 2.0)
    assert w.pid is not None and w.pid != pid and alive(w.pid)
    st = w.status()
    assert st is not None and st["state"] == "armed"
    assert node.serving(), "a guard killed before its deadline never fenced"
    # the restarted guard guards: let it act
    d = now() + 0.5
    w.pet(d)
    fence_time(node, d)


def test_a_slow_starting_guard_is_waited_for_not_started_again(node: Node) -> None:
    """A guard takes its lock only once its interpreter has imported everything (seconds on a loaded node,
    more under emulation). Pets meanwhile wait for it instead of starting one interpreter more each."""
    starts = node.root / "starts"
    slow = node.root / "slow-python"
    slow.write_text(f"#!/bin/sh\necho $$ >> {starts}\nsleep 3\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    node.config.write_text(node.config.read_text() + f'\n[watchdog.guard]\npython = "{slow}"\n')
    w = node.client()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 8:
        try:
            w.pet(now() + 5.0)
            break
        except TransientBackendError:
            time.sleep(0.3)                      # the agent's loop pets again soon
    else:
        raise AssertionError(f"the guard never answered; {node.log()}")
    assert len(starts.read_text().split()) == 1, f"started {starts.read_text().split()}"
    assert w.pid is not None and node.ours(w.pid)
    assert w.status() is not None


def test_a_frozen_guard_does_not_block_the_pet(node: Node) -> None:
    w = node.client()
    w.pet(now() + 3.0)
    pid = w.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        t = now()
        with pytest.raises(TransientBackendError, match=f"pid {pid}.*did not answer"):
            w.pet(now() + 3.0)
        took = now() - t
        assert took < w.timeout + 0.2, took
    finally:
        os.kill(pid, signal.SIGCONT)
    w.pet(now() + 3.0)
    assert w.pid == pid


def test_changed_config_hands_over_without_a_fence(node: Node) -> None:
    old_targets = node.targets
    w1 = node.client()
    d1 = now() + 1.0
    w1.pet(d1)
    old_hash, old_pid = w1.config_hash, w1.pid
    assert old_pid is not None
    w1.close()                          # planned restart, with an edited config: another target file
    new_targets = node.state / "fake-targets-2.json"
    node.fill(new_targets)
    node.write_config(target_file=new_targets, comment="edited")
    w2 = node.client()
    assert w2.config_hash != old_hash
    d2 = now() + 1.5
    w2.pet(d2)
    # the new guard was armed first, then the old one retired (exited without fencing)
    st = w2.status()
    assert st is not None and st["state"] == "armed" and st["pid"] != old_pid
    assert wait_for(lambda: not alive(old_pid), 2)
    assert not (node.state / protocol.sock_name(old_hash)).exists()
    assert set(node.guard_pids()) == {w2.config_hash}
    lines = node.log().splitlines()
    armed = next(i for i, x in enumerate(lines) if f"guard[{st['pid']}]" in x and "armed" in x)
    retired = next(i for i, x in enumerate(lines) if f"guard[{old_pid}]" in x and "retired" in x)
    assert armed < retired, "the old guard retired before the new one was armed"
    # past the old deadline: the old guard did not fence
    wait_for(lambda: now() > d1 + 0.2, 2)
    assert node.serving(old_targets) and node.serving(new_targets)
    assert read_events(str(node.state))["count"] == 0
    # the new guard fences with the new config (the new target file) at its own deadline
    fence_time(node, d2, new_targets)
    assert node.exports(old_targets)["paths"], "the old config's target file is not the new guard's"
    last = events(node, 1)["last"]
    assert last["config"] == w2.config_hash


def test_sigterm_never_drops_protection(node: Node) -> None:
    w = node.client()
    d = now() + 1.0
    w.pet(d)
    pid = w.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGUSR2)        # what systemctl restart sends the whole cgroup: ignored
    time.sleep(0.2)
    assert alive(pid)
    fence_time(node, d)                 # armed: fences at the deadline, then exits
    assert wait_for(lambda: not alive(pid), 2)


def test_guards_of_other_state_dirs_are_left_alone(node: Node, tmp_path: Path) -> None:
    other = Node(tmp_path / "other-node")
    other.fill()
    try:
        wo = other.client()
        wo.pet(now() + 5.0)
        w = node.client()
        w.pet(now() + 5.0)
        w.disarm()
        st = wo.status()
        assert st is not None and st["state"] == "armed" and alive(st["pid"])
        assert other.serving()
    finally:
        other.cleanup()


def test_a_state_dir_with_a_long_path(tmp_path: Path) -> None:
    """Unix socket addresses hold 107 bytes; a deeper state dir still works."""
    n = Node(tmp_path / ("x" * 60) / ("y" * 60))
    n.fill()
    try:
        assert len(str(n.state / "guard-0123456789ab.sock")) > protocol.MAX_SUN_PATH
        w = n.client()
        d = now() + 0.5
        w.pet(d)
        fence_time(n, d)
    finally:
        n.cleanup()


def test_constructor_touches_nothing(node: Node) -> None:
    before = sorted(os.listdir(node.state))
    w = node.client()
    w.close()
    assert sorted(os.listdir(node.state)) == before and not node.guard_pids()


def test_a_guard_that_cannot_start_is_reported(node: Node) -> None:
    w = node.client()
    assert w.config_hash                         # the agent read its config ...
    node.write_config(comment="edited under the running agent")   # ... and then the file changed
    with pytest.raises(TransientBackendError, match="exited at start.*changed since the agent read it"):
        w.pet(now() + 2)
    with pytest.raises(TransientBackendError, match="failed to start.*next attempt in"):
        w.pet(now() + 2)                         # no restart storm: it waits before trying again
    assert not node.guard_pids()


def test_an_interpreter_that_cannot_run(node: Node) -> None:
    cfg = config.load(str(node.config))
    ctx = plugins.context(cfg, "watchdog")
    w = GuardWatchdog(type(ctx)(node="", state_dir=ctx.state_dir, config_file=ctx.config_file,
                                options={"python": str(node.root / "no-such-python")}))
    with pytest.raises(PermanentBackendError, match="no-such-python"):
        w.pet(now() + 2)


def test_a_failing_part_does_not_stop_the_other_and_is_retried(node: Node) -> None:
    addr = node.state / "addresses-that-cannot-be-written"
    addr.mkdir()                                  # the fake network's record is a directory: fence fails
    node.config.write_text(node.config.read_text() + f'\n[network.fake]\nfile = "{addr}"\n')
    w = node.client()
    d = now() + 0.5
    w.pet(d)
    assert wait_for(lambda: not node.exports()["paths"], 1 + MAX_LAG), "the target was not fenced"
    last = events(node, 1)["last"]
    assert "fake address record" in last["network_error"] and last["target_error"] == ""
    addr.rmdir()                                  # the network recovers: the retry (1 s later) fences it
    assert wait_for(lambda: addr.is_file(), 3), "the network fence was not retried"
    assert json.loads(addr.read_text()) == {"addresses": {}}
    assert "done on retry" in node.log()


def test_while_the_new_guard_cannot_be_pet_the_old_one_is(node: Node) -> None:
    w1 = node.client()
    w1.pet(now() + 1.0)
    old_hash = w1.config_hash
    w1.close()
    node.config.write_text(node.config.read_text() + f'\n[watchdog.guard]\npython = "{node.root / "nope"}"\n')
    w2 = node.client()
    d = now() + 1.5
    with pytest.raises(PermanentBackendError, match="cannot start the guard"):
        w2.pet(d)
    st = protocol.request(str(node.state), old_hash, {"op": "status"}, 1.0)
    assert st["state"] == "armed" and abs(st["deadline"] - d) < 1e-6, "the old guard was not pet instead"
    fence_time(node, d)                  # and it still protects: it fences at the bridged deadline


# --- the guard confirms the agent's session by itself (real Consul) ------------------------------------

#: the [consul] timing of these tests: fence_after F, confirm_interval I, timeout T (the bounds of
#: docs/fencing.md hold: F > election_stall + I + T = 1.75, F + stop_time < lock_delay); F leaves room for
#: a busy host (2 CPUs shared with other test runs)
F, I, T, L = 3.0, 0.25, 0.5, 8.0


def consul_table(address: str, fence_after: float = F, timeout: float = T) -> str:
    return (f'address = "{address}"\nlock_delay = {L}\nfence_after = {fence_after}\nconfirm_interval = {I}\n'
            f"timeout = {timeout}\nelection_stall = 1.0\n")


class SessionNode(Node):
    """A node whose agent holds a real Consul session on the local Consul agent ``gwa``."""

    def __init__(self, root: Path, cluster: Any, address: str | None = None, fence_after: float = F,
                 timeout: float = T) -> None:
        super().__init__(root, consul_table(address or cluster.http_address("gwa"), fence_after, timeout))
        from agent.adapters.consul_store import ConsulStore
        self.cluster = cluster
        self.store = ConsulStore(config.load(str(self.config)).consul if address is None else
                                 config.ConsulConfig(address=cluster.http_address("gwa")))
        self.sid = self.store.create_session("gwa", "iSCSITarget", ["serfHealth"], L)

    def status(self, w: GuardWatchdog) -> dict[str, Any]:
        st = w.status()
        assert st is not None
        return st


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Any]:
    from lab.consul import ConsulCluster, consul_missing
    reason = consul_missing()
    if reason:
        pytest.skip(f"real Consul needed: {reason}")
    c = ConsulCluster(str(tmp_path / "consul"), servers=1, clients=["gwa"])
    try:
        c.start()
        yield c
    finally:
        c.teardown()


@pytest.fixture()
def snode(tmp_path: Path, cluster: Any) -> Iterator[SessionNode]:
    n = SessionNode(tmp_path / "node", cluster)
    n.fill()
    try:
        yield n
    finally:
        n.cleanup()
        print(n.log())


def serving_until(n: Node, until: float, step: float = 0.01) -> None:
    while now() < until:
        assert n.serving(), f"fenced {until - now():.2f}s before the test expected"
        time.sleep(step)


def test_the_guard_keeps_a_valid_session_served_while_nobody_pets_and_fences_once_it_is_gone(
        snode: SessionNode) -> None:
    w = snode.client()
    t0 = now()
    w.pet(t0 + F, snode.sid)
    w.close()                                    # the agent freezes: nobody pets any more
    serving_until(snode, t0 + 3 * F)             # three times as long as the last pet's deadline
    st = snode.status(w)
    assert st["state"] == "armed" and st["session"] == snode.sid[:8] and st["confirming"]
    assert st["confirmations"] >= 5, f"too few confirmations: {st}"
    assert st["deadline"] > now() and st["deadline"] == st["confirmed"]
    # never beyond the send time of its last good confirmation plus fence_after
    assert st["deadline"] == pytest.approx(st["confirm_sent"] + F, abs=1e-6)
    # the agent's fencer sees the same deadline in the guard's shared page (a thawed agent)
    assert w.confirmed(snode.sid) == pytest.approx(st["confirmed"], abs=I + T)
    assert w.confirmed("another-session") == -float("inf")
    assert read_events(str(snode.state))["count"] == 0
    # the session ends (Consul invalidated it): the next confirmation sees it and the guard fences at once
    snode.store.destroy_session(snode.sid)
    gone = now()
    assert wait_for(lambda: not snode.serving(), F + 1.0, 0.002), "no fence after the session ended"
    took = now() - gone
    last = events(snode, 1)["last"]
    assert last["reason"].startswith(f"session {snode.sid[:8]} is gone"), "fenced at once, not at the deadline"
    assert w.confirmed(snode.sid) == -float("inf")
    print(f"\n{st['confirmations']} confirmations by the guard in {st['now'] - t0:.1f}s without a pet; "
          f"fenced {took * 1e3:.0f} ms after the session was destroyed")


@pytest.mark.parametrize("how", ["stopped", "frozen"])
def test_the_guard_fences_at_its_deadline_when_consul_cannot_confirm(snode: SessionNode, how: str) -> None:
    w = snode.client()
    w.pet(now() + F, snode.sid)
    w.close()
    assert wait_for(lambda: snode.status(w)["confirmations"] >= 3, 3 * F), snode.status(w)
    cut = now()
    if how == "stopped":
        snode.cluster.stop("gwa")                # calls refused
    else:
        snode.cluster.freeze("gwa")              # calls hang until the HTTP timeout
    time.sleep(I + T + 0.1)                      # what was in flight at the cut has been answered
    st = snode.status(w)
    d = st["deadline"]
    assert st["state"] == "armed" and d <= cut + F + 1e-6, f"extended past the cut: {st}"
    assert d == pytest.approx(st["confirm_sent"] + F, abs=1e-6) and st["confirm_sent"] <= cut
    fence_time(snode, d)                         # serving until its deadline, fenced right after it
    last = events(snode, 1)["last"]
    assert 0 <= last["lag"] < MAX_LAG and last["reason"] == "deadline"
    assert last["confirm_error"], "the guard's confirmations failed meanwhile"
    if how == "frozen":
        snode.cluster.thaw("gwa")
    print(f"\nConsul agent {how}: the guard fenced {last['lag'] * 1e3:.1f} ms after its deadline, "
          f"{last['start'] - cut:.2f}s after the cut ({last['confirm_error'][:80]})")


def test_a_terminated_guard_stops_confirming_fences_at_its_deadline_and_exits(snode: SessionNode) -> None:
    w = snode.client()
    w.pet(now() + F, snode.sid)
    w.close()
    assert wait_for(lambda: snode.status(w)["confirmations"] >= 2, 3 * F), snode.status(w)
    pid = snode.status(w)["pid"]
    os.kill(pid, signal.SIGTERM)
    term = now()
    time.sleep(I + T + 0.1)                      # a confirmation in flight at the signal is answered
    d = snode.status(w)["deadline"]
    assert d <= term + F + 1e-6, "extended by a confirmation sent after SIGTERM"
    fence_time(snode, d)                         # the session is still valid: fenced at the deadline anyway
    assert events(snode, 1)["last"]["reason"] == "deadline"
    assert wait_for(lambda: not alive(pid), 2), "a terminated guard exits after its fence"
    reap(pid)


class SlowProxy:
    """A TCP forwarder to the real Consul agent that holds every answer back ``delay`` seconds and records
    when each request reached it (``CLOCK_BOOTTIME``): a slow Consul, without faking one."""

    def __init__(self, upstream: str, delay: float) -> None:
        import socket
        import threading
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay = delay
        self.arrivals: list[float] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.halt = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while not self.halt.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, True), daemon=True).start()

    def _pump(self, src: Any, dst: Any, slow: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if slow:
                    time.sleep(self.delay)
                else:
                    self.arrivals.append(now())
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.halt.set()
        self.listener.close()


def test_a_slow_consul_never_extends_beyond_the_send_time_plus_fence_after(tmp_path: Path, cluster: Any) -> None:
    delay = 0.6
    proxy = SlowProxy(cluster.http_address("gwa"), delay)
    n = SessionNode(tmp_path / "node", cluster, address=proxy.address, fence_after=4.0, timeout=1.0)
    n.fill()
    try:
        w = n.client()
        t0 = now()
        w.pet(t0 + 4.0, n.sid)
        w.close()
        serving_until(n, t0 + 8.0)                           # slow answers still prove the session
        st = n.status(w)
        assert st["confirmations"] >= 3 and st["confirm_error"] == "", st
        # each proof is the send time + fence_after: before the request even reached Consul, let alone
        # the answer came back
        reached = max(a for a in proxy.arrivals if a <= st["now"] - delay)
        assert st["deadline"] == pytest.approx(st["confirm_sent"] + 4.0, abs=1e-6)
        assert st["confirm_sent"] <= reached and st["deadline"] <= reached + 4.0
        assert st["deadline"] < st["now"] - delay + 4.0 + 1e-3, "a proof counted from the answer, not the send"
    finally:
        n.cleanup()
        proxy.close()
        print(n.log())
