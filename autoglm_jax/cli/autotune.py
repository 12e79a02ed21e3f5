"""``autoglm autotune``: search engine settings for the best serving throughput under a latency bound.

Owns: the flags of this command. The absl ``main`` reads the search space file, builds the objective,
workload and baseline, and calls ``autoglm_jax.tools.tuner.autotune`` with the serving benchmark (one
fresh process per trial, or in this process with --noisolate_trials) as the evaluation. Re-running the
same command resumes from the log. The space file's ``baseline: defaults`` runs the EngineConfig
defaults of the tuned parameters first, so the report says how much the best beats them (and bounds
like ``{metric: ttft_p90_ms, max_vs_baseline: 1.0}`` mean "no worse than the defaults").

    autoglm autotune --space space.yaml --strategy bayesian --max_trials 30 --output_dir autotune/
    -> autotune/trials.jsonl (log), results.csv, summary.md (markdown table + best vs default), best_config.json
"""

from __future__ import annotations

import functools
import gc
import logging
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("space", None, "Search space file (.json / .yaml): parameters, fixed, objective, benchmark, "
                    "baseline.")
flags.DEFINE_enum("strategy", "bayesian", ["grid", "random", "bayesian"], "Search strategy.")
flags.DEFINE_integer("max_trials", 20, "Most trials in the log (finished ones and the baseline count).")
flags.DEFINE_integer("seed", 0, "Strategy seed.")
flags.DEFINE_string("output_dir", "autotune", "Folder for trials.jsonl, results.csv, summary.md and best_config.json.")
flags.DEFINE_string("metric", None, "Objective metric (overrides the file's; default output_tokens_per_s).")
flags.DEFINE_float("max_ttft_p90_ms", None, "Adds the constraint ttft_p90_ms <= this.")
flags.DEFINE_float("trial_timeout_s", 1800.0, "Seconds one trial may take before it counts as failed.")
flags.DEFINE_float("time_budget_s", None, "Start no trial that would likely end more than this many seconds "
                   "after the start (default: no limit).")
flags.DEFINE_bool("isolate_trials", True, "Run each trial in a fresh process (frees the device between trials).")
flags.DEFINE_string("model", None, "Overrides the space file's fixed 'model' (e.g. tiny-llama for a CPU smoke run).")
flags.DEFINE_integer("num_requests", None, "Overrides the space file's benchmark 'num_requests'.")
flags.mark_flag_as_required("space")

SPEC_KEYS = {"parameters", "fixed", "objective", "benchmark", "baseline", "description"}  # description: free text


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from autoglm_jax.engine.config import EngineConfig
    from autoglm_jax.tools.autotune_report import summary_markdown, trial_line
    from autoglm_jax.tools.objective import Constraint, Objective
    from autoglm_jax.tools.search_space import SearchSpace, read_spec_file
    from autoglm_jax.tools.serving_benchmark import Workload, benchmark_settings, run_isolated
    from autoglm_jax.tools.tuner import autotune, write_best_config, write_csv

    logging.basicConfig(level=logging.INFO)
    spec = read_spec_file(FLAGS.space)
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise app.UsageError(f"{FLAGS.space}: unknown keys {unknown}; a space file has {sorted(SPEC_KEYS)}")
    if FLAGS.model:
        spec["fixed"] = {**(spec.get("fixed") or {}), "model": FLAGS.model}
    if FLAGS.num_requests:
        spec["benchmark"] = {**(spec.get("benchmark") or {}), "num_requests": FLAGS.num_requests}
    space = SearchSpace.from_dict(spec)
    space.check_names({f.name for f in dataclasses.fields(EngineConfig)})
    objective = Objective.from_dict(spec.get("objective") or {"metric": "output_tokens_per_s"})
    if FLAGS.metric:
        objective = dataclasses.replace(objective, metric=FLAGS.metric)
    if FLAGS.max_ttft_p90_ms is not None:
        objective = dataclasses.replace(objective, constraints=objective.constraints
                                        + (Constraint("ttft_p90_ms", max=FLAGS.max_ttft_p90_ms),))
    workload = Workload(**(spec.get("benchmark") or {}))
    baseline = baseline_params(spec.get("baseline"), space, EngineConfig())
    benchmark = (functools.partial(run_isolated, workload=workload, timeout_s=FLAGS.trial_timeout_s)
                 if FLAGS.isolate_trials else functools.partial(benchmark_settings, workload=workload))

    def evaluate(settings):
        EngineConfig.from_dict(settings)  # an invalid combination fails here, before any process starts
        try:
            return benchmark(settings)
        finally:
            gc.collect()  # in-process trials: the engine's jitted closures form cycles that hold its KV pool

    os.makedirs(FLAGS.output_dir, exist_ok=True)
    context = [f"Workload: {dataclasses.asdict(workload)}.", f"Fixed settings: {space.fixed}.",
               f"Strategy {FLAGS.strategy} (seed {FLAGS.seed}); trial 0 = the baseline {baseline}; bounds as given: "
               f"{objective.describe()}." if baseline else f"Strategy {FLAGS.strategy} (seed {FLAGS.seed})."]
    print(f"[autotune] {objective.describe()}; strategy {FLAGS.strategy}, up to {FLAGS.max_trials} trials"
          + (f" (the first: the baseline {baseline})" if baseline else ""), flush=True)

    def write_outputs(result):  # after every trial, so an interrupted run still leaves them
        write_csv(result.trials, os.path.join(FLAGS.output_dir, "results.csv"))
        with open(os.path.join(FLAGS.output_dir, "summary.md"), "w") as f:
            f.write(summary_markdown(result, context=context))
        if result.best is not None:
            write_best_config(result.best, space.fixed, os.path.join(FLAGS.output_dir, "best_config.json"))

    def report(result):
        print(f"[autotune] {trial_line(result.trials[-1], objective.metric)}", flush=True)
        write_outputs(result)

    result = autotune(space, objective, evaluate, strategy=FLAGS.strategy, max_trials=FLAGS.max_trials,
                      log_path=os.path.join(FLAGS.output_dir, "trials.jsonl"), seed=FLAGS.seed, baseline=baseline,
                      time_budget_s=FLAGS.time_budget_s, on_trial=report)
    context.insert(0, f"Device: {device_description()}.")
    write_outputs(result)
    print("\n" + summary_markdown(result, context=context), flush=True)
    if result.best is not None:
        print(f"[autotune] best trial {result.best.index}: {result.best.params} -> "
              f"{os.path.join(FLAGS.output_dir, 'best_config.json')}")


def baseline_params(setting, space, defaults) -> dict | None:
    """The space file's ``baseline``: None (no baseline), "defaults" (``defaults``' value of each tuned
    parameter) or a mapping of every parameter's value."""
    if setting is None:
        return None
    if setting == "defaults":
        return {name: getattr(defaults, name) for name in space.names}
    if isinstance(setting, dict):
        return dict(setting)
    raise ValueError(f"baseline={setting!r}; give 'defaults' or a mapping of every tuned parameter's value")


def device_description() -> str:
    """The accelerator the trials ran on (asked only now: an isolated run must not hold it meanwhile)."""
    import jax

    device = jax.devices()[0]
    return f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}"


if __name__ == "__main__":
    app.run(main)
