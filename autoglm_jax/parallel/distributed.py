"""Joining a multi-host JAX job: ``jax.distributed.initialize`` from explicit values, env vars or SLURM.

Owns: where the coordinator address / process count / process id come from, and switching the CPU
backend to gloo collectives so CPU processes can form one mesh (the loopback test; GPUs use NCCL).
It must run before anything touches a JAX backend. Launch recipes: ``docs/multi_host.md``.

Environment (all processes): AUTOGLM_COORDINATOR_ADDRESS=host:port, AUTOGLM_NUM_PROCESSES=N,
AUTOGLM_PROCESS_ID=i (0 on the coordinator host). Under SLURM with none of these set, JAX reads
SLURM_* itself.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import jax

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "AUTOGLM_COORDINATOR_ADDRESS", "AUTOGLM_NUM_PROCESSES", "AUTOGLM_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """One process's place in the job; all None = let JAX detect it (SLURM, cloud TPU...)."""

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        given = [v is not None for v in (self.coordinator_address, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise ValueError(f"coordinator_address, num_processes and process_id go together; got {self}")
        if all(given):
            if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
                raise ValueError(f"process_id={self.process_id} must be in [0, num_processes={self.num_processes})")
            if ":" not in self.coordinator_address:
                raise ValueError(f"coordinator_address={self.coordinator_address!r} must be host:port")

    @classmethod
    def from_env(cls, env=None) -> "DistributedConfig":
        env = os.environ if env is None else env
        address = env.get(ENV_ADDRESS)
        count, index = env.get(ENV_NUM_PROCESSES), env.get(ENV_PROCESS_ID)
        return cls(address, None if count is None else int(count), None if index is None else int(index))


def initialize(config: DistributedConfig | None = None, cpu_collectives: str = "gloo") -> None:
    """Joins the job (blocks until every process has). ``config`` None = ``DistributedConfig.from_env()``.
    On the CPU platform, cross-process collectives use ``cpu_collectives`` (gloo)."""
    config = config or DistributedConfig.from_env()
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes, process_id=config.process_id)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (a local coordinator's or server's; another process may take it
    before it is bound again, which tests and benchmarks on one machine accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def local_process_env(process_id: int, num_processes: int, port: int) -> dict[str, str]:
    """The environment that makes a process on this host join a ``num_processes`` job whose coordinator
    (process 0) listens on ``port`` (read by ``DistributedConfig.from_env``)."""
    DistributedConfig(f"127.0.0.1:{port}", num_processes, process_id)  # validates
    return {ENV_ADDRESS: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(process_id)}
