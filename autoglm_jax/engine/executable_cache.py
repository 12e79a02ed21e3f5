"""Compiled step programs saved to disk and loaded back without tracing: the engine's warm start.

Owns: the fingerprint of one step program (everything that decides its code: the source of this
package and of ``pallas_kernels`` with their tuning tables, jax / jaxlib versions, the platform version
(CUDA), the device kind and count, the process's ``XLA_FLAGS`` (compiler options from the environment), the
model's graph definition and the abstract values - shape, dtype, sharding - of every
argument; ``abstract_arguments`` gives those values, which programs are also lowered from, before any
weight exists) and saving / loading serialized executables under ``<dir>/<fingerprint>.exe``. It does not
own which programs exist (``ModelRunner.warmup``) or calling them.

JAX's persistent compilation cache already skips XLA compilation on a second start, but not tracing
and lowering a program, which for the unrolled 40-layer GLM-4-9B steps is most of a warm start
(benchmarks/RESULTS.md, "Start-up"). A loaded executable needs neither. A fingerprint that differs
in anything above (an edited kernel, another jax, another card) names another file, so a stale
executable is never loaded; an unreadable or incompatible file is ignored and recompiled.
On by default on GPU only (``resolve_executable_cache``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import pickle
import tempfile

import jax
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)
SOURCE_PACKAGES = ("autoglm_jax", "pallas_kernels")


@functools.cache
def source_digest() -> str:
    """sha256 over the source files (and tuning tables) of the packages whose code the programs run."""
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parents[2]
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".json") and path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _abstract(x) -> str:
    sharding = getattr(x, "sharding", None)
    return f"{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x).__name__)}:{sharding}"


def is_abstract(tree) -> bool:
    """True when every leaf of ``tree`` is a ``jax.ShapeDtypeStruct`` (an ``nnx.eval_shape`` model's state)."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def abstract_arguments(tree):
    """``tree`` with every jax array or ShapeDtypeStruct leaf as the ShapeDtypeStruct a program is lowered
    for: shape, dtype, weak type and sharding, a missing sharding (``jax.eval_shape`` output) being the
    default device's, where such arrays are made. Programs lowered from these take the real arrays; two
    trees are the same arguments exactly when their abstract trees compare equal. Other leaves (numpy
    inputs) are kept."""
    default = None

    def abstract(x):
        nonlocal default
        if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            return x
        sharding = x.sharding
        if sharding is None:
            default = default or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            sharding = default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type)

    return jax.tree.map(abstract, tree)


def same_arguments(a, b) -> bool:
    """Whether a program lowered for ``a`` takes ``b``: same tree, and leaves with equal abstract values."""
    leaves_a, tree_a = jax.tree.flatten(abstract_arguments(a))
    leaves_b, tree_b = jax.tree.flatten(abstract_arguments(b))
    return tree_a == tree_b and leaves_a == leaves_b


def fingerprint(name: str, graphdef, args: tuple, static: dict) -> str:
    """Hex key of the program ``name`` traced from ``graphdef`` on ``args`` with ``static`` kwargs."""
    devices = jax.devices()
    leaves, treedef = jax.tree.flatten(args)
    parts = [name, source_digest(), jax.__version__, jax.lib.__version__, devices[0].client.platform_version,
             devices[0].device_kind, str(len(devices)), os.environ.get("XLA_FLAGS", ""), repr(graphdef), str(treedef),
             repr(sorted(static.items())), *map(_abstract, leaves)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def resolve_executable_cache(setting: bool | None, compilation_cache_dir: str | None) -> str | None:
    """The engine arg ``executable_cache`` -> the directory to use, or None. None = on GPU only: on CPU an
    executable loaded into a process that had compiled the same program (a notebook starting a second
    engine) failed to run ("Function wrapped_iota not found"), and CPU start-up is not what it is for."""
    enabled = jax.default_backend() == "gpu" if setting is None else setting
    return os.path.join(compilation_cache_dir, "executables") if enabled and compilation_cache_dir else None


class ExecutableCache:
    """Serialized compiled programs in ``directory``, one file per fingerprint. A program this process
    compiled and saved itself is not loaded back into it (a second engine in the same process compiles
    again, from XLA's persistent cache): on XLA:CPU such a load failed to run."""

    saved_here: set[pathlib.Path] = set()  # files this process wrote

    def __init__(self, directory: str):
        self.directory = pathlib.Path(directory)

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.exe"

    def load(self, key: str):
        """The loaded executable saved under ``key``, or None (missing, unreadable, or not loadable here)."""
        path = self._path(key)
        if not path.exists() or path in self.saved_here:
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # a truncated / foreign file is a cache miss, never an error
            log.warning("executable cache: ignoring %s (%s: %s)", path.name, type(e).__name__, e)
            return None

    def save(self, key: str, compiled) -> None:
        """Writes ``compiled`` atomically (another process may read the same key at the same time)."""
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception as e:  # some executables (e.g. with host callbacks) do not serialize
            log.warning("executable cache: not saving %s (%s: %s)", key[:12], type(e).__name__, e)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.directory, delete=False, suffix=".tmp") as f:
            f.write(blob)
        os.replace(f.name, self._path(key))
        self.saved_here.add(self._path(key))
