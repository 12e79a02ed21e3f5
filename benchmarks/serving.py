"""Serving benchmark through ``AutoGLMEngine``: offline throughput and Poisson-rate online load, per batching mode.

One process sweeps batching modes x workloads x request rates; each mode builds one engine (one
compile) and reuses it for every workload and rate. Prompts are random token ids (no tokenizer); a
preset name gives random weights made on the device. Per run it reports output tok/s, req/s, mean
latency and TTFT / TPOT / ITL / end-to-end p50, p90, p99, and GPU utilisation sampled from NVML.
--json writes the rows as they finish (a run cut short by a time limit keeps what it measured);
--plot draws output tok/s against mean latency, one line per configuration; --merge puts results
files (this script's and ``hf_serving.py``'s) in one table, speed-up line and plot without running.
Engine settings come from --config (a JSON/YAML file of EngineConfig fields, e.g. the autotuner's
best_config.json) and the engine flags below.

    .venv/bin/python benchmarks/serving.py --model=tiny-llama --num_requests=16 --input_len=32 --output_len=16
    # issue 5 on one GPU: the offline target (--step_log: where its time goes, per engine call, and the launch
    # thread's hand-offs; 512 / 4,096 is the fastest setting measured on an H100), then the seed's table
    # (modes x fixed/mixed x rates)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 benchmarks/serving.py --model=glm-4-9b-0414 --max_batch_size=512 \
        --max_num_batched_tokens=4096 --max_sequence_length=2048 --num_requests=1000 --input_len=1000 \
        --output_len=1000 --json=serving.json [--step_log]
    python3 benchmarks/serving.py --model=glm-4-9b-0414 --max_batch_size=256 --max_num_batched_tokens=2048 \
        --max_sequence_length=2048 --batching_modes --workloads=fixed,mixed --num_requests=256 \
        --online_num_requests=128 --input_len=512 --output_len=256 --request_rates=inf,8,32 --deadline_s=400 \
        --json=modes.json --plot=modes.png
    python3 benchmarks/serving.py --merge=serving.json,hf_serving.json --plot=serving.png  # + hf_serving.py's
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time

from _serving_report import markdown_table, parse_rates, plot, rate_label, read_results, speedups, write_results
from _serving_workload import ServingWorkload, named_workloads
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Preset (random weights), HF directory, .gguf or Orbax checkpoint "
                    "(default: embedded SmolLM2).")
flags.DEFINE_string("config", None, "JSON/YAML file of EngineConfig settings (flags given explicitly override it).")
flags.DEFINE_integer("max_batch_size", 32, "Sequences decoding together.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Token budget of one engine step.")
flags.DEFINE_integer("max_sequence_length", None, "Prompt + output tokens of one sequence (default: the "
                     "workloads' longest request, rounded up to a multiple of 256).")
flags.DEFINE_integer("num_requests", 64, "Requests of an offline run.")
flags.DEFINE_integer("online_num_requests", None, "Requests of a Poisson-rate run (default: --num_requests).")
flags.DEFINE_integer("input_len", 128, "Prompt tokens per request (mean, for the mixed workload).")
flags.DEFINE_integer("output_len", 64, "Output tokens per request (mean, for the mixed workload); EOS ignored.")
flags.DEFINE_list("workloads", ["fixed"], "fixed: every request input_len / output_len; mixed: lengths uniform "
                  "in [L(1-r), L(1+r)] with r = --range_ratio.")
flags.DEFINE_float("range_ratio", 0.9, "Spread r of the mixed workload's lengths (vLLM's --random-range-ratio).")
flags.DEFINE_list("request_rates", ["inf"], "Poisson arrival rates in requests/s; inf = offline (all at t=0).")
flags.DEFINE_alias("request_rate", "request_rates")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_bool("batching_modes", False, "Run static batching, continuous (dynamic) batching and continuous "
                  "batching with the adaptive window (the seed's three rows) instead of the configured engine.")
flags.DEFINE_float("deadline_s", None, "Start no engine or run after this many seconds (runs in flight finish); "
                   "the skipped ones are listed. Default: no deadline.")
flags.DEFINE_string("json", None, "Write the results (rows + settings) to this file, after every run.")
flags.DEFINE_string("plot", None, "Write a PNG of output tok/s against mean latency (needs matplotlib).")
flags.DEFINE_bool("ablate_queued_multistep", False, "Also run every (workload, rate) on the same engine with the "
                  "decode policy of before: one decode step per call whenever a request waits (even one that "
                  "cannot join the full batch).")
flags.DEFINE_list("merge", None, "Results files to put in one table / plot (no benchmark runs).")
flags.DEFINE_float("profile_at_s", None, "Trace the device from this many seconds into each offline run for "
                   "--profile_s and print busy share, idle gaps (where the long ones sit: kernels around them, the "
                   "host threads meanwhile) and the top kernels by kind (jax.profiler with its Python tracer, which slows the "
                   "host's Python while it runs; tools.device_profile).")
flags.DEFINE_float("profile_s", 2.0, "Length of the --profile_at_s window.")
flags.DEFINE_bool("step_log", False, "Log every engine call of the offline runs (``EngineCore.enable_step_log``) and "
                  "print where the run's wall time went: mixed (prefill) vs decode calls, ms per call and per "
                  "decode step, host time; stored as the row's 'step_log' in --json.")

# The seed's three rows, in its order: (name, EngineConfig overrides). They run adaptive first, static last,
# so a --deadline_s cuts the baseline rather than the engine's default mode.
BATCHING_MODES = (
    ("static batching", {"use_dynamic_batching": False}),
    ("dynamic batching", {"use_dynamic_batching": True, "adaptive_batching": False}),
    ("adaptive batching", {"use_dynamic_batching": True, "adaptive_batching": True}),
)
_ENGINE_FLAGS = ("model", "max_batch_size", "max_num_batched_tokens", "max_sequence_length")
_MAX_SEQUENCE_ROUNDING = 256


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.merge:
        metas, rows = read_results(FLAGS.merge)
        for meta in metas:
            print(_describe(meta))
        report(rows)
        return
    started = time.monotonic()
    runs = build_runs()
    settings = engine_settings(runs)
    modes = BATCHING_MODES[::-1] if FLAGS.batching_modes else ((mode_name(settings), {}),)
    meta = run_meta(settings)
    print(_describe(meta), flush=True)
    rows: list[dict] = []
    for name, overrides in modes:
        rows += run_mode(name, {**settings, **overrides}, runs, meta, rows, started)
        gc.collect()  # the engine's jitted closures form reference cycles: free its memory before the next
    order = [name for name, _ in BATCHING_MODES]
    rows.sort(key=lambda r: order.index(r["mode"]) if r["mode"] in order else len(order))
    if FLAGS.json:
        write_results(FLAGS.json, meta, rows)
    report(rows)
    if meta["skipped"]:
        print(f"\nskipped (--deadline_s={FLAGS.deadline_s}): {'; '.join(meta['skipped'])}")


def _profile_window(meta: dict):
    from autoglm_jax.tools.device_profile import backend_planes, profile_window

    return profile_window(FLAGS.profile_at_s, FLAGS.profile_s, **backend_planes(meta["backend"]))


def _print_profile(window) -> None:
    """The --profile_at_s window of the run that just ended (merged by kernel kind), or why there is none."""
    if not window.done():
        print(f"[profile] the run ended before the window ({FLAGS.profile_at_s} + {FLAGS.profile_s} s) closed; "
              "waiting for it", flush=True)
    try:
        profile = window.result(timeout=FLAGS.profile_at_s + FLAGS.profile_s + 60)
    except Exception as error:  # a benchmark run is not failed by its optional trace
        print(f"[profile] no trace: {error!r}", flush=True)
        return
    print(f"[profile] {FLAGS.profile_s:g} s from {FLAGS.profile_at_s:g} s into the run:\n"
          + profile.by_kind().format(12), flush=True)


def build_runs() -> list[tuple[ServingWorkload, float | None]]:
    """(workload at its offline size, request rate) for every --workloads x --request_rates pair."""
    try:
        workloads = named_workloads(FLAGS.workloads, FLAGS.num_requests, FLAGS.input_len, FLAGS.output_len,
                                    FLAGS.range_ratio, FLAGS.seed)
        return [(workload, rate) for workload in workloads for rate in parse_rates(FLAGS.request_rates)]
    except ValueError as error:
        raise app.UsageError(str(error))


def at_rate(workload: ServingWorkload, rate: float | None) -> ServingWorkload:
    if rate is None:
        return workload
    return dataclasses.replace(workload, request_rate=rate,
                               num_requests=FLAGS.online_num_requests or workload.num_requests)


def engine_settings(runs) -> dict:
    from autoglm_jax.cli.engine_settings import settings_from_flags

    settings = settings_from_flags(FLAGS, _ENGINE_FLAGS, FLAGS.config)
    longest = max(at_rate(workload, rate).max_total_len() for workload, rate in runs)
    if settings.get("max_sequence_length") is None:
        settings["max_sequence_length"] = -(-longest // _MAX_SEQUENCE_ROUNDING) * _MAX_SEQUENCE_ROUNDING
    if settings["max_sequence_length"] < longest:
        raise app.UsageError(f"max_sequence_length={settings['max_sequence_length']} is shorter than the workload's "
                             f"longest request ({longest} tokens): raise it or shorten --input_len/--output_len")
    return settings


def mode_name(settings: dict) -> str:
    from autoglm_jax.engine.config import EngineConfig

    config = EngineConfig.from_dict(settings)
    if not config.use_dynamic_batching:
        return "static batching"
    return "adaptive batching" if config.adaptive_batching else "dynamic batching"


def run_meta(settings: dict) -> dict:
    import jax

    return {"engine": "autoglm-jax", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax_version": jax.__version__, "settings": settings, "argv": sys.argv[1:], "skipped": []}


def run_mode(name: str, settings: dict, runs, meta: dict, done: list[dict], started: float) -> list[dict]:
    """Builds one engine with ``settings`` and does every (workload, rate) run on it; returns the rows."""
    from _serving_load import run_requests

    from autoglm_jax.engine.async_engine import AutoGLMEngine
    from autoglm_jax.engine.step_log import format_step_summary

    if _past_deadline(started):
        meta["skipped"] += [f"{name} / {w.label} / {rate_label(r)}" for w, r in runs]
        return []
    in_use = _device_bytes_in_use()  # what an earlier engine left behind would show here
    build_start = time.perf_counter()
    engine = AutoGLMEngine({"show_progress": False, **settings, "skip_tokenizer_init": True}).start()
    build = {"engine_build_s": time.perf_counter() - build_start, "warmup_s": engine.core.warmup_seconds,
             "num_pages": engine.core.allocator.num_pages, "device_bytes_in_use_before_build": in_use}
    print(f"[{name}] engine built in {build['engine_build_s']:.1f} s (warmup compile {build['warmup_s']:.1f} s), "
          f"{build['num_pages']} KV pages; device memory in use before: "
          f"{'n/a' if in_use is None else f'{in_use / 2**30:.1f} GiB'}", flush=True)
    rows = []
    try:
        run_requests(engine, ServingWorkload(2, min(16, FLAGS.input_len), 4), sample_gpu=False)  # first-call costs
        for workload, rate in runs:
            if _past_deadline(started):
                meta["skipped"].append(f"{name} / {workload.label} / {rate_label(rate)}")
                continue
            run = at_rate(workload, rate)
            for ablated in (False, True) if FLAGS.ablate_queued_multistep else (False,):
                scheduler = engine.core.scheduler
                if ablated:  # before: a non-empty queue alone forced one decode step per call
                    scheduler.admission_blocked = lambda: scheduler.num_waiting == 0
                window = _profile_window(meta) if rate is None and FLAGS.profile_at_s is not None else None
                try:
                    metrics = run_requests(engine, run, sample_gpu=meta["backend"] == "gpu",
                                           step_log=FLAGS.step_log and rate is None)
                finally:
                    vars(scheduler).pop("admission_blocked", None)
                if window is not None:
                    _print_profile(window)
                mode = f"{name}, one decode step per call while queued (before)" if ablated else name
                rows.append({"engine": "autoglm-jax", "mode": mode, "workload": workload.label, "request_rate": rate,
                             **metrics, **build, "settings": settings, "workload_spec": dataclasses.asdict(run)})
                print(_progress_line(rows[-1]), flush=True)
                if "step_log" in metrics:
                    print(format_step_summary(metrics["step_log"]), flush=True)
                if FLAGS.json:
                    write_results(FLAGS.json, meta, done + rows)
    finally:
        engine.stop(drain=False)
    return rows


def _device_bytes_in_use() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


def _past_deadline(started: float) -> bool:
    return FLAGS.deadline_s is not None and time.monotonic() - started > FLAGS.deadline_s


def _progress_line(row: dict) -> str:
    util = row.get("gpu_util_mean_pct")
    return (f"[{row['mode']}] {row['workload']} {rate_label(row['request_rate'])}: {row['num_requests']} requests, "
            f"{row['output_tokens_per_s']:,.0f} output tok/s, mean latency {row['e2e_mean_ms']:,.0f} ms, "
            f"TTFT p50 {row['ttft_p50_ms']:,.0f} ms, TPOT p50 {row['tpot_p50_ms']:.1f} ms, GPU util "
            f"{'n/a' if util is None else f'{util:.0f}%'} over {row['duration_s']:.1f} s")


def _describe(meta: dict) -> str:
    versions = ", ".join(f"{k.split('_')[0]} {v}" for k, v in meta.items() if k.endswith("_version"))
    return f"{meta['engine']} on {meta['device']} ({versions}); settings {meta.get('settings')}"


def report(rows: list[dict]) -> None:
    print("\n" + markdown_table(rows))
    lines = speedups(rows)
    if lines:
        print("\n" + "\n".join(lines))
    if FLAGS.plot:
        try:
            plot(rows, FLAGS.plot)
        except ImportError as error:
            print(f"no plot ({error}); draw it elsewhere: python benchmarks/serving.py --merge=<json> --plot=<png>")
        else:
            print(f"\nplot: {FLAGS.plot}")


if __name__ == "__main__":
    app.run(main)
