"""The data-parallel load balancer: most available KV pages first, then the shortest queue, and
balanced page demand under skewed request lengths (where round-robin is not)."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_jax.parallel.balancer import ReplicaLoad, pages_for, pick_replica


def test_most_available_pages_wins():
    loads = [ReplicaLoad(100, 10, 1), ReplicaLoad(120, 5, 9), ReplicaLoad(200, 150, 0)]
    assert pick_replica(loads) == 1  # available 90, 115, 50


def test_ties_on_pages_go_to_the_shortest_queue_then_lowest_index():
    assert pick_replica([ReplicaLoad(50, 0, 3), ReplicaLoad(60, 10, 2), ReplicaLoad(50, 0, 2)]) == 1
    assert pick_replica([ReplicaLoad(50, 0, 2), ReplicaLoad(50, 0, 2)]) == 0


def test_bad_loads_are_refused_by_name():
    with pytest.raises(ValueError, match="free_pages=-1"):
        ReplicaLoad(-1, 0, 0)
    with pytest.raises(ValueError, match="at least one"):
        pick_replica([])
    assert pages_for(33, 16) == 3 and pages_for(32, 16) == 2 and pages_for(0, 16) == 0


class _Replica:
    """A replica as the balancer sees it: capacity, and the page demand of requests routed to it."""

    def __init__(self, capacity: int):
        self.capacity, self.demands = capacity, []

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.capacity, sum(self.demands), len(self.demands))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skewed_request_lengths_balance_page_demand_across_replicas(seed):
    rng = np.random.default_rng(seed)
    # Heavy-tailed lengths, and the long ones arrive with period 4 — round-robin over 4 replicas
    # would pile every long request onto replica 0.
    tokens = [int(rng.integers(1500, 3000)) if i % 4 == 0 else int(rng.integers(10, 200)) for i in range(200)]
    demands = [pages_for(n, 16) for n in tokens]
    replicas = [_Replica(10_000) for _ in range(4)]
    for demand in demands:
        replicas[pick_replica([r.load() for r in replicas])].demands.append(demand)
    totals = [sum(r.demands) for r in replicas]
    spread = max(totals) - min(totals)
    assert spread <= max(demands), (totals, max(demands))
    round_robin = [sum(demands[i::4]) for i in range(4)]
    assert spread * 10 < max(round_robin) - min(round_robin), (totals, round_robin)
    print(f"page demand per replica: balanced {totals}, round-robin {round_robin}")


def test_a_replica_whose_requests_finished_gets_the_next_ones():
    busy, idle = ReplicaLoad(10, 5, 4), ReplicaLoad(300, 0, 0)
    assert pick_replica([busy, idle]) == 1
    assert pick_replica([ReplicaLoad(300, 0, 0), ReplicaLoad(300, 40, 1)]) == 0
