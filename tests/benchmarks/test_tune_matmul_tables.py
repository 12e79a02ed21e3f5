"""benchmarks/tune_matmul.py --write_from: a GPU run's --out file (the device's working tree does not come back)
becomes tuning-table entries on any machine -- each result under its kernel's table and shape key, other cards'
entries kept, the same card's entry for the same key replaced, and ``tuning.lookup`` reads them."""

import importlib
import json
from pathlib import Path

import pytest

from pallas_kernels import int4_matmul as i4
from pallas_kernels import matmul as mm
from pallas_kernels import tuning

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


@pytest.fixture
def tune_matmul(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))  # not a package
    return importlib.import_module("tune_matmul")


@pytest.fixture
def tables(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNING_DIR", tmp_path)
    tuning._load_table.cache_clear()
    yield tmp_path
    tuning._load_table.cache_clear()


def test_write_from_a_runs_results(tune_matmul, tables, monkeypatch):
    def result(dtype, shape, m, best):
        k, n = tune_matmul.SHAPES[shape]
        return dict(dtype=dtype, shape=shape, m=m, k=k, n=n, best=best, best_ms=0.01, heuristic_ms=0.02, xla_ms=0.015)

    old = {"tile_n": 128, "tile_k": 128, "num_stages": 4, "num_k_splits": 4}
    kept = dict(device_kind=H100, dtype="int8", shape="M8_K4096_N4608", config=old)
    replaced = dict(device_kind=H200, dtype="int8", shape="M8_K4096_N4608", config=old)
    (tables / "quantized_matmul.json").write_text(json.dumps({"entries": [kept, replaced]}))
    new = {"tile_n": 128, "tile_k": 256, "num_stages": 3, "num_k_splits": 6}
    run = dict(device_kind=H200, jax="0.11.2", copy_gbs=4000.0, results=[
        result("int8", "qkv", 1, new), result("bfloat16", "down", 16, new),
        result("int4-g64", "gate_up", 1, new), result("w8a8-fp8", "o_proj", 64, new)])
    path = tables / "run.json"
    path.write_text(json.dumps(run))

    tune_matmul.main(["--write_from", str(path)])

    def entries(kernel):
        return {(e["device_kind"], e["dtype"], e["shape"]): e["config"]
                for e in json.loads((tables / f"{kernel}.json").read_text())["entries"]}

    assert entries("quantized_matmul") == {(H100, "int8", "M8_K4096_N4608"): old,
                                           (H200, "int8", "M8_K4096_N4608"): new}
    assert entries("matmul") == {(H200, "bfloat16", "M16_K13696_N4096"): new}
    assert list(entries("int4_matmul")) == [(H200, "int4", i4.shape_key(1, 4096, 27392, 64))]
    assert entries("w8a8_matmul") == {(H200, "float8_e4m3fn", "M64_K4096_N4096"): new}
    monkeypatch.setattr(tuning, "device_kind", lambda: H200)
    assert tuning.lookup("quantized_matmul", "int8", mm.shape_key(1, 4096, 4608)) == new
    written = json.loads((tables / "matmul.json").read_text())["entries"][0]
    assert (written["kernel_us"], written["xla_us"]) == (10.0, 15.0)  # the run's times: beats_xla reads them
    assert tuning.beats_xla("matmul", "bfloat16", "M16_K13696_N4096")


def test_from_table_times_the_cards_entry_beside_the_heuristic(tune_matmul, tables, monkeypatch):
    k, n = tune_matmul.SHAPES["o_proj"]
    heuristic = tune_matmul.heuristic_config("bfloat16", 8, k, n)
    tabled = {**heuristic, "num_stages": 5 - heuristic["num_stages"] % 3}  # any config other than the heuristic's
    entry = dict(device_kind=H200, dtype="bfloat16", shape=mm.shape_key(8, k, n), config=tabled)
    (tables / "matmul.json").write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setattr(tuning, "device_kind", lambda: H200)
    assert list(tune_matmul.candidates("bfloat16", 8, k, n, sweep=False, from_table=True)) == [heuristic, tabled]
    assert list(tune_matmul.candidates("bfloat16", 8, k, n, sweep=False)) == [heuristic]
    swept = list(tune_matmul.candidates("bfloat16", 8, k, n, sweep=True, from_table=True))
    assert swept.count(tabled) == 1 and swept.count(heuristic) == 1
    monkeypatch.setattr(tuning, "device_kind", lambda: H100)  # another card's table holds nothing for this one
    assert list(tune_matmul.candidates("bfloat16", 8, k, n, sweep=False, from_table=True)) == [heuristic]
