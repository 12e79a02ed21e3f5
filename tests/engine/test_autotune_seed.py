"""XLA autotuning seeds: copied into the compilation cache only where it lacks an entry, exported back."""

import io
import os
import tarfile

import pytest

from autoglm_jax.engine import autotune_seed as seeds


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_card_slug_names_the_device_kind():
    assert seeds.card_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert seeds.card_slug("NVIDIA H200") == "nvidia_h200"
    assert seeds.seed_path_for("NVIDIA H200") == seeds.SEEDS_DIR / "nvidia_h200.tar.gz"
    with pytest.raises(ValueError, match="no letters or digits"):
        seeds.card_slug(" - ")


def test_seed_copies_only_missing_files_and_keeps_the_cache_s_own(tmp_path):
    seed, cache = tmp_path / "seed", tmp_path / "cache"
    _write(seed / "a.textproto", "seed a")
    _write(seed / "sub" / "b.textproto", "seed b")
    _write(cache / seeds.CACHE_SUBDIR / "a.textproto", "cache a")  # the cache's own result wins
    assert seeds.seed_autotune_cache(str(cache), seed) == 1
    target = cache / seeds.CACHE_SUBDIR
    assert (target / "a.textproto").read_text() == "cache a"
    assert (target / "sub" / "b.textproto").read_text() == "seed b"
    assert not list(target.rglob("*.seeding"))  # no partial files left behind
    assert seeds.seed_autotune_cache(str(cache), seed) == 0  # idempotent


def test_missing_seed_directory_seeds_nothing(tmp_path):
    assert seeds.seed_autotune_cache(str(tmp_path / "cache"), tmp_path / "absent") == 0
    assert not (tmp_path / "cache").exists()


def test_export_round_trips_and_refuses_an_empty_cache(tmp_path):
    cache, seed = tmp_path / "cache", tmp_path / "seed"
    with pytest.raises(FileNotFoundError, match="no XLA autotuning results"):
        seeds.export_autotune_seed(str(cache), seed)
    _write(cache / seeds.CACHE_SUBDIR / "x.textproto", "x")
    _write(cache / seeds.CACHE_SUBDIR / "y.textproto", "y")
    assert seeds.export_autotune_seed(str(cache), seed) == 2
    fresh = tmp_path / "fresh"
    assert seeds.seed_autotune_cache(str(fresh), seed) == 2
    assert sorted(os.listdir(fresh / seeds.CACHE_SUBDIR)) == ["x.textproto", "y.textproto"]


def test_resolve_seed_setting(tmp_path):
    assert seeds.resolve_seed(None, "NVIDIA H100 80GB HBM3") is None
    assert seeds.resolve_seed("", "NVIDIA H100 80GB HBM3") is None
    assert seeds.resolve_seed("auto", "NVIDIA H100 80GB HBM3") == seeds.SEEDS_DIR / "nvidia_h100_80gb_hbm3.tar.gz"
    assert seeds.resolve_seed(str(tmp_path), "NVIDIA H100 80GB HBM3") == tmp_path


def test_engine_seeding_is_a_no_op_off_gpu(tmp_path):
    seed = tmp_path / "seed"
    _write(seed / "a.textproto", "a")
    assert seeds.seed_for_engine(str(tmp_path / "cache"), str(seed)) == 0  # CPU backend: XLA:CPU has no GEMM autotuning
    assert seeds.seed_for_engine(None, str(seed)) == 0


def test_archive_seed_round_trips_merges_and_is_deterministic(tmp_path):
    first, second, archive = tmp_path / "c1", tmp_path / "c2", tmp_path / "seeds" / "card.tar.gz"
    _write(first / seeds.CACHE_SUBDIR / "h" / "x.pb", "x1")
    _write(second / seeds.CACHE_SUBDIR / "h" / "x.pb", "x2")  # a later run's result for the same fusion
    _write(second / seeds.CACHE_SUBDIR / "h" / "y.pb", "y")
    assert seeds.export_autotune_seed(str(first), archive) == 1
    assert seeds.export_autotune_seed(str(second), archive) == 2  # merged into the archive
    fresh = tmp_path / "fresh"
    assert seeds.seed_autotune_cache(str(fresh), archive) == 2
    assert (fresh / seeds.CACHE_SUBDIR / "h" / "x.pb").read_text() == "x2"
    assert (fresh / seeds.CACHE_SUBDIR / "h" / "y.pb").read_text() == "y"
    again = tmp_path / "again.tar.gz"
    seeds.export_autotune_seed(str(fresh), again)
    assert again.read_bytes() == archive.read_bytes()  # same entries -> same bytes (no timestamps)


def test_archive_members_outside_the_cache_are_skipped(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        for name in ("../escape.pb", "/abs.pb", "ok/fine.pb"):
            info = tarfile.TarInfo(name)
            info.size = 2
            out.addfile(info, io.BytesIO(b"ab"))
    cache = tmp_path / "cache"
    assert seeds.seed_autotune_cache(str(cache), archive) == 1
    assert (cache / seeds.CACHE_SUBDIR / "ok" / "fine.pb").read_bytes() == b"ab"
    assert not (tmp_path / "escape.pb").exists() and not (cache / "escape.pb").exists()


def test_corrupt_archive_is_logged_not_raised(tmp_path, caplog):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a gzip file")
    assert seeds.seed_autotune_cache(str(tmp_path / "cache"), bad) == 0
    assert "not (fully) copied" in caplog.text


def test_the_shipped_h100_seed_is_a_readable_archive():
    path = seeds.seed_path_for("NVIDIA H100 80GB HBM3")
    with tarfile.open(path, "r:gz") as archive:
        names = archive.getnames()
    assert len(names) > 100 and all(seeds._safe(n) is not None for n in names)
