"""``autoglm autotune``: search engine settings for the best serving throughput under a latency bound.

Owns: the flags of this command. The absl ``main`` reads the search space file, builds the objective
and workload, and calls ``autoglm_jax.tools.tuner.autotune`` with the serving benchmark (one fresh
process per trial) as the evaluation. Re-running the same command resumes from --log.

    autoglm autotune --space space.yaml --strategy bayesian --max_trials 30 --output_dir autotune/
    -> autotune/trials.jsonl (log), autotune/results.csv, autotune/best_config.json
"""

from __future__ import annotations

import functools
import logging
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("space", None, "Search space file (.json / .yaml): parameters, fixed, objective, benchmark.")
flags.DEFINE_enum("strategy", "bayesian", ["grid", "random", "bayesian"], "Search strategy.")
flags.DEFINE_integer("max_trials", 20, "Most trials in the log (finished ones count when resuming).")
flags.DEFINE_integer("seed", 0, "Strategy seed.")
flags.DEFINE_string("output_dir", "autotune", "Folder for trials.jsonl, results.csv and best_config.json.")
flags.DEFINE_string("metric", None, "Objective metric (overrides the file's; default output_tokens_per_s).")
flags.DEFINE_float("max_ttft_p90_ms", None, "Adds the constraint ttft_p90_ms <= this.")
flags.DEFINE_float("trial_timeout_s", 1800.0, "Seconds one trial may take before it counts as failed.")
flags.DEFINE_bool("isolate_trials", True, "Run each trial in a fresh process (frees the device between trials).")
flags.mark_flag_as_required("space")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from autoglm_jax.engine.config import EngineConfig
    from autoglm_jax.tools.objective import Constraint, Objective
    from autoglm_jax.tools.search_space import SearchSpace, read_spec_file
    from autoglm_jax.tools.serving_benchmark import Workload, benchmark_settings, run_isolated
    from autoglm_jax.tools.tuner import autotune, write_best_config, write_csv

    logging.basicConfig(level=logging.INFO)
    spec = read_spec_file(FLAGS.space)
    space = SearchSpace.from_dict(spec)
    space.check_names({f.name for f in dataclasses.fields(EngineConfig)})
    objective = Objective.from_dict(spec.get("objective") or {"metric": "output_tokens_per_s"})
    if FLAGS.metric:
        objective = dataclasses.replace(objective, metric=FLAGS.metric)
    if FLAGS.max_ttft_p90_ms is not None:
        objective = dataclasses.replace(objective, constraints=objective.constraints
                                        + (Constraint("ttft_p90_ms", max=FLAGS.max_ttft_p90_ms),))
    workload = Workload(**(spec.get("benchmark") or {}))
    evaluate = (functools.partial(run_isolated, workload=workload, timeout_s=FLAGS.trial_timeout_s)
                if FLAGS.isolate_trials else functools.partial(benchmark_settings, workload=workload))
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    print(f"[autotune] {objective.describe()}; strategy {FLAGS.strategy}, up to {FLAGS.max_trials} trials")

    def report(trial):
        value = trial.result.get(objective.metric) if trial.result else None
        print(f"[autotune] trial {trial.index}: {trial.params} -> {objective.metric}={value} "
              f"{'feasible' if trial.feasible else 'infeasible' if trial.status == 'ok' else 'FAILED'}", flush=True)

    result = autotune(space, objective, lambda settings: evaluate(settings), strategy=FLAGS.strategy,
                      max_trials=FLAGS.max_trials, log_path=os.path.join(FLAGS.output_dir, "trials.jsonl"),
                      seed=FLAGS.seed, on_trial=report)
    write_csv(result.trials, os.path.join(FLAGS.output_dir, "results.csv"))
    if result.best is None:
        print("[autotune] no feasible trial: relax the constraints or widen the space")
        return
    best_path = os.path.join(FLAGS.output_dir, "best_config.json")
    write_best_config(result.best, space.fixed, best_path)
    print(f"[autotune] best trial {result.best.index}: {result.best.params} "
          f"{objective.metric}={result.best.result[objective.metric]:.2f} -> {best_path}")


if __name__ == "__main__":
    app.run(main)
