"""The autotuner on cheap synthetic objectives: grid finds the optimum, TPE beats random, runs resume."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from autoglm_jax.tools.objective import Constraint, Objective
from autoglm_jax.tools.search_space import SearchSpace, read_spec_file
from autoglm_jax.tools.trial_log import TrialLog
from autoglm_jax.tools.tuner import autotune, write_best_config, write_csv

SPACE_2D = SearchSpace.from_dict({"parameters": {"x": {"low": 0, "high": 23, "type": "int"},
                                                 "y": {"low": 0, "high": 23, "type": "int"}}})
OPTIMUM = {"x": 11, "y": 4}


def bowl(settings):
    return {"score": -float((settings["x"] - OPTIMUM["x"]) ** 2 + (settings["y"] - OPTIMUM["y"]) ** 2)}


def serving_like(settings):
    """Throughput grows with batch and budget; TTFT grows with batch and shrinks with prefill_ratio."""
    batch, ratio = settings["max_batch_size"], settings["prefill_ratio"]
    return {"output_tokens_per_s": 100.0 * batch * (0.5 + ratio), "ttft_p90_ms": 10.0 * batch / ratio}


def test_grid_finds_the_constrained_optimum(tmp_path):
    space = SearchSpace.from_dict({"parameters": {"max_batch_size": {"values": [4, 8, 16, 32]},
                                                  "prefill_ratio": {"values": [0.25, 0.5, 1.0]}},
                                   "fixed": {"model": "tiny-llama"}})
    objective = Objective("output_tokens_per_s", constraints=(Constraint("ttft_p90_ms", max=200.0),))
    result = autotune(space, objective, serving_like, strategy="grid", max_trials=100,
                      log_path=str(tmp_path / "log.jsonl"))
    assert len(result.trials) == 12  # the grid is exhausted before max_trials
    assert result.best.params == {"max_batch_size": 16, "prefill_ratio": 1.0}
    infeasible = [t for t in result.trials if not t.feasible]
    assert infeasible and all(t.value < result.best.value for t in infeasible)
    best = write_best_config(result.best, space.fixed, str(tmp_path / "best.json"))
    assert json.loads((tmp_path / "best.json").read_text()) == best == {"model": "tiny-llama", "max_batch_size": 16,
                                                                      "prefill_ratio": 1.0}
    write_csv(result.trials, str(tmp_path / "results.csv"))
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("trial,status,feasible,max_batch_size,prefill_ratio")


def _trials_to_optimum(strategy: str, seed: int, tmp_path, max_trials: int = 80) -> int:
    result = autotune(SPACE_2D, Objective("score"), bowl, strategy=strategy, max_trials=max_trials,
                      log_path=str(tmp_path / f"{strategy}-{seed}.jsonl"), seed=seed)
    return next((t.index + 1 for t in result.trials if t.params == OPTIMUM), max_trials + 1)


def test_bayesian_needs_fewer_trials_than_random(tmp_path):
    seeds = range(10)
    bayesian = [_trials_to_optimum("bayesian", s, tmp_path) for s in seeds]
    random_ = [_trials_to_optimum("random", s, tmp_path) for s in seeds]
    test = stats.mannwhitneyu(bayesian, random_, alternative="less")
    assert np.mean(bayesian) < np.mean(random_), (bayesian, random_)
    assert test.pvalue < 0.05, f"bayesian {bayesian} vs random {random_}: p={test.pvalue:.3f}"


class Interrupt(BaseException):
    pass


@pytest.mark.parametrize("strategy", ["grid", "random", "bayesian"])
def test_interrupted_run_resumes_where_it_stopped(tmp_path, strategy):
    space = SearchSpace.from_dict({"parameters": {"x": {"values": [0, 5, 11, 15]}, "y": {"low": 0, "high": 15,
                                                                                         "type": "int"}}})
    full = autotune(space, Objective("score"), bowl, strategy=strategy, max_trials=10,
                    log_path=str(tmp_path / "full.jsonl"), seed=3)
    calls = []

    def interrupted_at_6(settings):
        if len(calls) == 6:
            raise Interrupt()
        calls.append(settings)
        return bowl(settings)

    log_path = str(tmp_path / "resumed.jsonl")
    with pytest.raises(Interrupt):
        autotune(space, Objective("score"), interrupted_at_6, strategy=strategy, max_trials=10, log_path=log_path, seed=3)
    with open(log_path, "a") as f:
        f.write('{"index": 6, "params": {"x"')  # a line cut off mid-write
    calls.clear()
    resumed = autotune(space, Objective("score"), lambda s: calls.append(s) or bowl(s), strategy=strategy,
                       max_trials=10, log_path=log_path, seed=3)
    assert len(calls) == 4  # only the missing trials ran again
    assert [t.params for t in resumed.trials] == [t.params for t in full.trials]
    assert [t.value for t in resumed.trials] == [t.value for t in full.trials]


def test_resume_refuses_a_different_space(tmp_path):
    log_path = str(tmp_path / "log.jsonl")
    autotune(SPACE_2D, Objective("score"), bowl, strategy="random", max_trials=2, log_path=log_path)
    other = SearchSpace.from_dict({"parameters": {"x": {"values": [1, 2]}}})
    with pytest.raises(ValueError, match="different search space"):
        autotune(other, Objective("score"), bowl, strategy="random", max_trials=2, log_path=log_path)


def test_failed_trials_are_logged_not_raised(tmp_path):
    def flaky(settings):
        if settings["x"] == 5:
            raise MemoryError("out of memory at x=5")
        return bowl(settings)

    space = SearchSpace.from_dict({"parameters": {"x": {"values": [0, 5, 11]}, "y": {"values": [4]}}})
    result = autotune(space, Objective("score"), flaky, strategy="grid", max_trials=5, log_path=str(tmp_path / "l"))
    failed = [t for t in result.trials if t.status == "failed"]
    assert len(failed) == 1 and "out of memory at x=5" in failed[0].error and failed[0].value == -math.inf
    assert result.best.params == {"x": 11, "y": 4}
    assert len(TrialLog(str(tmp_path / "l"), json.loads(open(tmp_path / "l").readline())["header"]).load()) == 3


def test_space_file_and_validation(tmp_path):
    (tmp_path / "space.yaml").write_text("parameters:\n  max_batch_size: {values: [8, 16]}\n"
                                         "  prefill_ratio: {low: 0.5, high: 1.0}\nfixed: {page_size: 16}\n")
    space = SearchSpace.from_dict(read_spec_file(tmp_path / "space.yaml"))
    assert space.names == ("max_batch_size", "prefill_ratio") and space.fixed == {"page_size": 16}
    with pytest.raises(ValueError, match="float range"):
        space.grid()
    with pytest.raises(ValueError, match=r"unknown settings \['bogus'\]"):
        SearchSpace.from_dict({"parameters": {"bogus": {"values": [1]}}}).check_names({"max_batch_size"})
    with pytest.raises(ValueError, match="either 'values' or both"):
        SearchSpace.from_dict({"parameters": {"x": {"low": 1}}})
    with pytest.raises(ValueError, match="log=True needs low > 0"):
        SearchSpace.from_dict({"parameters": {"x": {"low": 0, "high": 4, "log": True}}})


def test_objective_ranks_infeasible_below_feasible():
    objective = Objective("tps", "maximize", (Constraint("ttft", max=100.0),))
    assert objective.search_value({"tps": 1.0, "ttft": 50.0}) == 1.0
    slightly, badly = objective.search_value({"tps": 9e9, "ttft": 110.0}), objective.search_value({"tps": 9e9, "ttft": 900.0})
    assert badly < slightly < 0.0
    assert Objective("lat", "minimize").search_value({"lat": 3.0}) == -3.0
    assert objective.search_value({"ttft": 1.0}) == -math.inf  # metric missing


def test_baseline_runs_first_and_bounds_the_others(tmp_path):
    space = SearchSpace.from_dict({"parameters": {"max_batch_size": {"values": [16, 32, 64]},
                                                  "prefill_ratio": {"values": [0.5, 1.0]}}})
    objective = Objective.from_dict({"metric": "output_tokens_per_s",
                                     "constraints": [{"metric": "ttft_p90_ms", "max_vs_baseline": 1.0}]})
    assert "ttft_p90_ms <= 1 x the baseline's" in objective.describe()
    defaults = {"max_batch_size": 32, "prefill_ratio": 0.8}  # outside the space
    calls = []
    evaluate = lambda s: calls.append(s) or serving_like(s)  # noqa: E731
    result = autotune(space, objective, evaluate, strategy="grid", max_trials=5, baseline=defaults,
                      log_path=str(tmp_path / "log.jsonl"))
    assert calls[0] == defaults and result.baseline.index == 0 and result.baseline.params == defaults
    bound = serving_like(defaults)["ttft_p90_ms"]  # 400 ms
    assert result.objective.constraints[0].max == bound and result.objective.describe().endswith(f"<= {bound:g}")
    for trial in result.trials:
        assert trial.feasible == (trial.result["ttft_p90_ms"] <= bound)
    calls.clear()
    resumed = autotune(space, objective, evaluate, strategy="grid", max_trials=10, baseline=defaults,
                       log_path=str(tmp_path / "log.jsonl"))
    assert len(calls) == 2 and defaults not in calls  # the baseline is not run again; the grid is finished
    assert resumed.objective == result.objective and resumed.baseline == result.baseline
    assert resumed.best.params == {"max_batch_size": 32, "prefill_ratio": 1.0}  # 4800 tok/s at 320 ms vs 4160 at 400


def test_bayesian_is_not_told_about_a_baseline_outside_the_space(tmp_path):
    space = SearchSpace.from_dict({"parameters": {"max_batch_size": {"values": [16, 32]},
                                                  "prefill_ratio": {"values": [0.5, 1.0]}}})
    baseline = {"max_batch_size": 32, "prefill_ratio": 0.8}
    assert not space.contains(baseline) and space.contains({"max_batch_size": 32, "prefill_ratio": 1.0})
    result = autotune(space, Objective("output_tokens_per_s"), serving_like, strategy="bayesian", max_trials=3,
                      baseline=baseline, log_path=str(tmp_path / "log.jsonl"))
    assert [t.status for t in result.trials] == ["ok"] * 3 and all(space.contains(t.params) for t in result.trials[1:])


def test_relative_bounds_need_a_baseline_that_ran(tmp_path):
    space = SearchSpace.from_dict({"parameters": {"max_batch_size": {"values": [16, 64]}}})
    objective = Objective("tps", constraints=(Constraint("ttft", max_vs_baseline=1.5),))
    with pytest.raises(ValueError, match="need a baseline"):
        autotune(space, objective, bowl, strategy="grid", max_trials=2, log_path=str(tmp_path / "a"))

    def broken(settings):
        raise MemoryError("out of memory")

    log_path = tmp_path / "b"
    with pytest.raises(RuntimeError, match="baseline trial .* failed.*out of memory"):
        autotune(space, objective, broken, strategy="grid", max_trials=2, baseline={"max_batch_size": 16},
                 log_path=str(log_path))
    assert len(log_path.read_text().splitlines()) == 1  # header only: a re-run tries the baseline again
    with pytest.raises(ValueError, match="exactly the parameters"):
        autotune(space, Objective("tps"), bowl, strategy="grid", max_trials=2, baseline={"page_size": 16},
                 log_path=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="instead of 'max'"):
        Constraint("ttft", max=1.0, max_vs_baseline=1.0)
    with pytest.raises(ValueError, match="a constraint is"):
        Objective.from_dict({"metric": "tps", "constraints": [{"metric": "ttft", "maximum": 3}]})


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    perf_counter = monotonic


def test_time_budget_starts_no_trial_that_would_overrun(tmp_path, monkeypatch):
    from autoglm_jax.tools import tuner

    clock = FakeClock()
    monkeypatch.setattr(tuner, "time", clock)

    def ten_seconds(settings):
        clock.now += 10.0
        return bowl(settings)

    result = autotune(SPACE_2D, Objective("score"), ten_seconds, strategy="random", max_trials=20,
                      baseline={"x": 0, "y": 0}, time_budget_s=35.0, log_path=str(tmp_path / "log"))
    assert len(result.trials) == 3 and result.stop_reason == "time_budget"  # a 4th would end at 40 s
    assert [t.seconds for t in result.trials] == [10.0, 10.0, 10.0]
    result = autotune(SPACE_2D, Objective("score"), ten_seconds, strategy="random", max_trials=4,
                      log_path=str(tmp_path / "log2"))
    assert len(result.trials) == 4 and result.stop_reason == "max_trials"


def test_report_table_and_comparison(tmp_path):
    from autoglm_jax.tools.autotune_report import comparison, summary_markdown, trials_table

    space = SearchSpace.from_dict({"parameters": {"max_batch_size": {"values": [8, 16, 64]},
                                                  "prefill_ratio": {"values": [0.5, 1.0]}}})
    objective = Objective("output_tokens_per_s", constraints=(Constraint("ttft_p90_ms", max_vs_baseline=1.0),))

    def evaluate(settings):
        if settings["max_batch_size"] == 8:
            raise MemoryError("out of memory | at 8")
        return serving_like(settings)

    seen = []
    result = autotune(space, objective, evaluate, strategy="grid", max_trials=10, log_path=str(tmp_path / "log"),
                      baseline={"max_batch_size": 16, "prefill_ratio": 0.5}, on_trial=seen.append)
    # the baseline is a grid point too, so the grid skips it: 1 + 5 trials
    assert [r.stop_reason for r in seen] == ["running"] * 6 and [len(r.trials) for r in seen] == list(range(1, 7))
    assert result.stop_reason == "exhausted" and result.best.params == {"max_batch_size": 16, "prefill_ratio": 1.0}
    table = trials_table(result).splitlines()
    assert table[0] == ("| trial | max_batch_size | prefill_ratio | output_tokens_per_s | ttft_p90_ms | ttft_p50_ms | "
                        "tpot_p50_ms | e2e_p90_ms | feasible | seconds |")
    assert len(table) == 2 + 6 and table[2].startswith("| 0 (default) | 16 | 0.5 | 1600.0 | 320.0 | – |")
    assert table[3].startswith("| 1 | 8 | 0.5 | – |") and "failed: MemoryError: out of memory / at 8 |" in table[3]
    assert [row for row in table if row.startswith("| **")] == [
        "| **3** | **16** | **1.0** | **2400.0** | **160.0** | **–** | **–** | **–** | **yes** | **0** |"]
    assert comparison(result) == ("Best (trial 3) beats the default (trial 0): output_tokens_per_s 2400.0 vs 1600.0 "
                                  "(+50.0%) at ttft_p90_ms <= 320 (ttft_p90_ms 160.0 vs 320.0).")
    summary = summary_markdown(result, context=["Device: test."])
    assert summary.startswith("Autotune: maximize output_tokens_per_s subject to ttft_p90_ms <= 320; 6 trials "
                              "(the strategy ran out of points).\nDevice: test.\n\n| trial |")
    worse = autotune(space, Objective("output_tokens_per_s"), evaluate, strategy="grid", max_trials=2,
                     log_path=str(tmp_path / "log2"), baseline={"max_batch_size": 64, "prefill_ratio": 1.0})
    assert comparison(worse) == "No trial beat the default (trial 0) at no bound."
