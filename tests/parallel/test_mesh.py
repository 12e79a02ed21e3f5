"""Meshes from tp/dp sizes and the multi-host settings: clear errors for sizes that do not fit."""

from __future__ import annotations

import jax
import pytest

from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.parallel.distributed import DistributedConfig, local_process_env
from autoglm_jax.parallel.mesh import engine_mesh, make_mesh, replica_meshes


def test_one_device_mesh_and_replica_split():
    mesh = make_mesh(1, 1)
    assert mesh.axis_names == ("dp", "tp") and mesh.devices.shape == (1, 1)
    (replica,) = replica_meshes(mesh)
    assert replica.axis_names == ("tp",) and replica.devices.tolist() == [jax.devices()[0]]
    assert engine_mesh(1, 1) is None


def test_more_devices_than_exist_is_an_error_naming_the_sizes():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"tensor_parallel_size=2 x data_parallel_size={n} = {2 * n} devices"):
        make_mesh(2, n)
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        make_mesh(0, 1)
    with pytest.raises(ValueError, match="data_parallel_size=2: an EngineCore is one replica"):
        engine_mesh(1, 2)


def test_engine_config_validates_parallel_sizes():
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="data_parallel_size"):
        EngineConfig(data_parallel_size=1.5)
    assert EngineConfig.from_dict({"tensor_parallel_size": 2, "data_parallel_size": 2}).data_parallel_size == 2


def test_distributed_config_from_env_and_validation():
    env = {"AUTOGLM_COORDINATOR_ADDRESS": "10.0.0.1:1234", "AUTOGLM_NUM_PROCESSES": "2", "AUTOGLM_PROCESS_ID": "1"}
    assert DistributedConfig.from_env(env) == DistributedConfig("10.0.0.1:1234", 2, 1)
    assert DistributedConfig.from_env({}) == DistributedConfig()
    with pytest.raises(ValueError, match="go together"):
        DistributedConfig("10.0.0.1:1234", None, None)
    with pytest.raises(ValueError, match="process_id=2"):
        DistributedConfig("10.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        DistributedConfig("10.0.0.1", 2, 0)


def test_local_process_env_round_trips():
    assert DistributedConfig.from_env(local_process_env(1, 2, 4321)) == DistributedConfig("127.0.0.1:4321", 2, 1)
    with pytest.raises(ValueError, match="process_id=2"):
        local_process_env(2, 2, 4321)
