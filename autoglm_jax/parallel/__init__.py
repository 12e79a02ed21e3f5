"""Multi-device serving: tensor parallelism (shard_map), data-parallel replicas, multi-host.

Modules: ``mesh`` (device meshes from tp/dp sizes), ``shard_config`` (per-shard model sizes),
``layout`` (TP weight layout and partition specs), ``sharded_steps`` (the jitted steps under
shard_map), ``balancer`` / ``replicas`` (DP fronts: replicas stepped from threads, or ``replica_processes`` +
``replica_worker``: one OS process per replica), ``distributed`` / ``multihost`` (multi-host).
"""
