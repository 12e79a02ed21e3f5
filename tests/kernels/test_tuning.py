"""Tuning tables: a matching entry wins, anything else falls back (never fails)."""

from __future__ import annotations

import json

import jax.numpy as jnp

from pallas_kernels import matmul as mm
from pallas_kernels import tuning
from pallas_kernels._interpret import INTERPRETED_DEVICE_KIND, gpu_interpret


def test_lookup_hits_matching_entry_and_misses_others(tmp_path, monkeypatch):
    entry = {"device_kind": INTERPRETED_DEVICE_KIND, "dtype": "bfloat16", "shape": "M16_K4096_N4096",
             "config": {"tile_n": 256, "tile_k": 128, "num_stages": 3, "num_k_splits": 4}}
    (tmp_path / "matmul.json").write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setattr(tuning, "TUNING_DIR", tmp_path)
    tuning._load_table.cache_clear()
    try:
        with gpu_interpret():
            assert mm.default_config(16, 4096, 4096, jnp.bfloat16) == mm.MatmulConfig(**entry["config"])
            assert tuning.lookup("matmul", jnp.float16, "M16_K4096_N4096") is None
            assert tuning.lookup("no_such_kernel", jnp.bfloat16, "x") is None
            fallback = mm.default_config(8, 4096, 4096, jnp.bfloat16)  # untuned shape: heuristic
            assert fallback.num_k_splits >= 1 and 4096 % (fallback.tile_k * fallback.num_k_splits) == 0
    finally:
        tuning._load_table.cache_clear()


def test_beats_xla_reads_the_measured_times_of_this_cards_entries(tmp_path, monkeypatch):
    def entry(shape, times, kind=INTERPRETED_DEVICE_KIND):
        return {"device_kind": kind, "dtype": "bfloat16", "shape": shape, "config": {}, **times}

    (tmp_path / "matmul.json").write_text(json.dumps({"entries": [
        entry("M8_K128_N256", {"kernel_us": 9.0, "xla_us": 10.0}),
        entry("M16_K128_N256", {"kernel_us": 11.0, "xla_us": 10.0}),  # measured slower
        entry("M32_K128_N256", {"kernel_us": 9.8, "xla_us": 10.0}),  # faster by less than the noise margin
        entry("M8_K256_N128", {}),  # tuned before times were recorded: not known to be faster
        entry("M8_K128_N128", {"kernel_us": 1.0, "xla_us": 10.0}, kind="another card")]}))
    monkeypatch.setattr(tuning, "TUNING_DIR", tmp_path)
    tuning._load_table.cache_clear()
    try:
        with gpu_interpret():
            assert tuning.shape_keys_beating_xla("matmul", jnp.bfloat16) == ["M8_K128_N256"]
            assert mm.beats_xla(3, 128, 256, jnp.bfloat16)  # M = 1..8 share the M8 entry
            assert not mm.beats_xla(16, 128, 256, jnp.bfloat16) and not mm.beats_xla(32, 128, 256, jnp.bfloat16)
            assert not mm.beats_xla(8, 256, 128, jnp.bfloat16) and not mm.beats_xla(8, 128, 128, jnp.bfloat16)
            assert not mm.beats_xla(8, 128, 256, jnp.float16)
            assert mm.beats_xla_at(128, 256, jnp.bfloat16) and not mm.beats_xla_at(256, 128, jnp.bfloat16)
    finally:
        tuning._load_table.cache_clear()


def test_split_k_fills_the_sms_and_weighs_partial_sums():
    with gpu_interpret():  # 8 simulated SMs
        sms = tuning.num_sms()
        split = lambda tiles, steps, partial: tuning.split_k(tiles, steps, step_bytes=1 << 15,
                                                             partial_bytes_per_split=partial)
        assert split(sms // 2, 32, 1 << 10) == 2  # 4 output tiles on 8 SMs: two splits fill them
        assert split(sms, 32, 1 << 10) == 1  # already a full wave: splitting only adds partial sums
        assert split(sms * 3 // 2, 32, 1 << 10) > 1  # 1.5 waves: splitting evens the tail ...
        assert split(sms * 3 // 2, 32, 1 << 22) == 1  # ... unless the partial sums cost more than the tail
        assert split(1, 107, 1 << 10) == 8  # a prime step count splits unevenly (14 steps, the last 9)
        assert split(1, 6, 1) == 1  # every split keeps >= 4 steps


def test_memory_bound_split_k_stops_once_the_ctas_reach_the_bandwidth():
    """The small-M kernel streams weights: enough CTAs to reach the HBM bandwidth (STREAM_FILL of the SMs), no
    more -- a partly filled second wave costs nothing there (the sweeps' choice for GLM-4's gate_up, 214 tiles
    on 132 SMs: one split, 65.8 us against 80.7 for the old wave model's 8 on an H200)."""
    with gpu_interpret():  # 8 simulated SMs: STREAM_FILL * 8 = 6 CTAs reach the bandwidth
        sms = tuning.num_sms()
        split = lambda tiles, steps, partial: tuning.split_k(tiles, steps, step_bytes=1 << 15,
                                                             partial_bytes_per_split=partial, memory_bound=True)
        assert split(sms * 3 // 2, 32, 1 << 10) == 1  # 12 tiles: past the bandwidth, splitting only adds partial sums
        assert split(sms // 2, 32, 1 << 10) == 2  # 4 tiles x 2 splits = 8 CTAs >= 6
        assert split(1, 107, 1 << 10) == 6  # one tile: 6 splits reach the fill, uneven ones move no extra bytes
        assert split(sms // 2, 32, 1 << 22) == 1  # partial sums dearer than the missing bandwidth: no split
        assert split(1, 6, 1) == 1  # every split keeps >= 4 steps
