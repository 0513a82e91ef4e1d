"""Tier 2 fixtures: real Consul clusters (``lab.consul.ConsulCluster``).

``consul_cluster_factory(clients=[...], servers=1, **kw)`` starts a cluster in a fresh directory under the
test's ``tmp_path`` and returns it once it is ready; every cluster made is torn down at the end of the test
(the log tails are printed then, so a failing test shows them). Without the Consul binary the test is
skipped, saying why and how to fix it (``bash scripts/setup``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from lab.consul import ClientSpec, ConsulCluster, consul_missing


@pytest.fixture
def consul_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., ConsulCluster]]:
    reason = consul_missing()
    if reason:
        pytest.skip(f"real Consul needed: {reason}")
    made: list[ConsulCluster] = []

    def make(clients: Sequence[str | ClientSpec] = (), servers: int = 1, **kw: Any) -> ConsulCluster:
        cluster = ConsulCluster(str(tmp_path / f"consul-{len(made)}"), servers=servers, clients=clients, **kw)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in reversed(made):
        cluster.teardown()
        for name in cluster.nodes:
            print(f"----- consul {name} log (tail): {cluster.log_path(name)} -----\n{cluster.log_tail(name, 15)}")
