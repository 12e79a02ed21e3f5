"""Load-aware placement of requests on data-parallel engine replicas (pure host Python, no JAX).

Owns: the routing rule. A request goes to the replica with the most KV pages left once the work it
already holds is counted — free pages minus the pages its unfinished requests may still claim as
they grow to their length limit — then to the one with the shortest queue, then the lowest index.
Counting committed pages (not just free ones) is what balances skewed request lengths: one replica
holding a few long requests is as loaded as another holding many short ones. It does not see devices
or requests' tokens: the caller (``parallel.replicas``) measures each replica's ``ReplicaLoad``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """One replica's state as the balancer sees it."""

    free_pages: int       # KV pages free in its pool now
    committed_pages: int  # pages its unfinished requests may still allocate (waiting: all; running: growth)
    num_requests: int     # running + waiting sequences

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ReplicaLoad.{field.name}={value!r} must be an int >= 0")

    @property
    def available_pages(self) -> int:
        """Pages left after every queued and running request reaches its limit (may be negative)."""
        return self.free_pages - self.committed_pages


def pick_replica(loads: Sequence[ReplicaLoad]) -> int:
    """Index of the replica a new request should go to (most available pages, then shortest queue)."""
    if not loads:
        raise ValueError("pick_replica needs at least one replica load")
    return min(range(len(loads)), key=lambda i: (-loads[i].available_pages, loads[i].num_requests, i))


def pages_for(num_tokens: int, page_size: int) -> int:
    """KV pages that ``num_tokens`` tokens occupy."""
    if page_size < 1:
        raise ValueError(f"page_size={page_size} must be >= 1")
    return -(-max(num_tokens, 0) // page_size)
