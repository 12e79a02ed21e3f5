"""XLA's GEMM autotuning results shipped per card as data, so a cold start compiles without re-autotuning.

Owns: the seed archives ``autoglm_jax/engine/autotune_seeds/<card>.tar.gz`` (the files of XLA's
per-fusion autotune cache, as XLA writes them: one small proto per fused GEMM, named by a hash of the
fusion's HLO and the card's description; a seed may also be a plain directory of them), copying the current card's seed into the persistent compilation cache before
the first compile (``seed_autotune_cache``) and turning a filled cache back into a seed
(``export_autotune_seed``, used by ``benchmarks/startup.py --export_autotune_seed``). It does not own
turning the compilation cache on (``engine.memory.enable_compilation_cache``).

Why: a cold start of the GLM-4-9B engine on an H100 is bound by XLA timing its Triton GEMM candidates
for every fused projection of every step program (benchmarks/RESULTS.md, "Start-up"); the results
depend only on the fusion and the card, as the Pallas kernels' tuning tables do. JAX points XLA's
per-fusion cache at ``<compilation cache>/xla_gpu_per_fusion_autotune_cache_dir`` (the default of
``jax_persistent_cache_enable_xla_caches``); XLA reads an entry there instead of autotuning and adds
the fusions it had to tune. A fusion the seed lacks (another model, another bucket, another XLA) is
autotuned as before, so a stale or foreign seed costs nothing but its absence. Seeding copies only
files the cache does not have (results the cache already holds win) and never fails the start: an
unreadable seed is logged and skipped.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pathlib
import re
import shutil
import tarfile

log = logging.getLogger(__name__)

SEEDS_DIR = pathlib.Path(__file__).parent / "autotune_seeds"
CACHE_SUBDIR = "xla_gpu_per_fusion_autotune_cache_dir"  # the name JAX gives XLA's per-fusion cache


def card_slug(device_kind: str) -> str:
    """Directory name of a card's seed: "NVIDIA H100 80GB HBM3" -> "nvidia_h100_80gb_hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
    if not slug:
        raise ValueError(f"device kind {device_kind!r} has no letters or digits to name a seed directory")
    return slug


def seed_path_for(device_kind: str) -> pathlib.Path:
    """The shipped seed archive of ``device_kind`` (it may not exist)."""
    return SEEDS_DIR / f"{card_slug(device_kind)}.tar.gz"


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _safe(name: str) -> pathlib.PurePosixPath | None:
    """An archive member's relative path, or None for one that would leave the cache directory."""
    path = pathlib.PurePosixPath(name)
    return None if path.is_absolute() or ".." in path.parts or not path.parts else path


def _seed_entries(seed: pathlib.Path):
    """(relative path, bytes reader) of every result file of a seed directory or .tar.gz archive."""
    if seed.is_dir():
        for rel in _files(seed):
            yield pathlib.PurePosixPath(rel.as_posix()), (lambda rel=rel: (seed / rel).read_bytes())
        return
    with tarfile.open(seed, "r:gz") as archive:
        for member in archive.getmembers():
            rel = _safe(member.name)
            if member.isfile() and rel is not None:
                yield rel, (lambda member=member: archive.extractfile(member).read())


def seed_autotune_cache(compilation_cache_dir: str, seed: str | os.PathLike) -> int:
    """Copies the seed's result files that ``<compilation_cache_dir>/xla_gpu_per_fusion_autotune_cache_dir``
    lacks into it; returns how many were copied (0 when the seed does not exist)."""
    source = pathlib.Path(seed)
    if not source.exists():
        return 0
    target = pathlib.Path(compilation_cache_dir) / CACHE_SUBDIR
    copied = 0
    try:
        for rel, read in _seed_entries(source):
            dest = target / rel
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{dest.name}.{os.getpid()}.seeding")  # replica processes may seed one cache at once
            tmp.write_bytes(read())
            os.replace(tmp, dest)  # XLA never sees a half-written entry
            copied += 1
    except (OSError, tarfile.TarError) as e:
        log.warning("XLA autotuning seed %s not (fully) copied into %s: %s; the rest is autotuned", source, target, e)
    return copied


def resolve_seed(setting: str | None, device_kind: str) -> pathlib.Path | None:
    """EngineConfig.xla_autotune_seed -> the seed to copy from: "auto" = the shipped archive of this card,
    a path = that directory or .tar.gz, None / "" = no seeding."""
    if not setting:
        return None
    return seed_path_for(device_kind) if setting == "auto" else pathlib.Path(setting)


def seed_for_engine(compilation_cache_dir: str | None, setting: str | None) -> int:
    """The engine's start: seeds the compilation cache from ``setting`` (EngineConfig.xla_autotune_seed) for the
    default device's card when the cache is on and the backend is a GPU; returns the files copied."""
    import jax

    if not compilation_cache_dir or not setting or jax.default_backend() != "gpu":
        return 0
    seed = resolve_seed(setting, jax.devices()[0].device_kind)
    copied = seed_autotune_cache(compilation_cache_dir, seed)
    log.info("XLA autotuning seed %s: %d result files copied into the compilation cache", seed, copied)
    return copied


def export_autotune_seed(compilation_cache_dir: str, dest: str | os.PathLike) -> int:
    """Adds the autotune results of a compilation cache to the seed ``dest``: a ``.tar.gz`` archive (its
    other entries kept; written deterministically: sorted, no timestamps) or a directory. Returns how many
    files the cache gave; raises if it has none."""
    source = pathlib.Path(compilation_cache_dir) / CACHE_SUBDIR
    files = _files(source) if source.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no XLA autotuning results under {source} (was the compilation cache on, on a GPU?)")
    dest = pathlib.Path(dest)
    if not dest.name.endswith(".tar.gz"):
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, dest / rel)
        return len(files)
    entries = {str(rel): read() for rel, read in _seed_entries(dest)} if dest.exists() else {}
    entries.update({rel.as_posix(): (source / rel).read_bytes() for rel in files})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as packed, \
            tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(entries[name]), 0o644
            archive.addfile(info, io.BytesIO(entries[name]))
    os.replace(tmp, dest)
    return len(files)
