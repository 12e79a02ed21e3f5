"""Data-parallel replicas as OS processes (``parallel.replica_processes``) on CPU, with a tiny random
GLM-4 checkpoint and a tiny BPE tokenizer: DP=2 gives one engine's tokens and text (greedy, a text prompt
with a stop string, and sampled without a seed: the front seeds as one engine would), a burst of adds
spreads before the replicas report, skewed lengths balance by KV pages, abort of a request running in a
replica, bad requests raise in the front and send nothing, ``AutoGLMEngine`` over the front, a killed
replica raises instead of hanging, ``close`` leaves no process, and a replica failing or dying at
start-up raises its traceback / exit code.

One front (two replica processes) serves the tests in file order; the last of them closes it.
TP=2 x DP=2 over processes was checked by hand (same tokens) but costs ~30 s on CPU: not run here.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from autoglm_jax.engine.async_engine import AutoGLMEngine
from autoglm_jax.engine.config import EngineConfig
from autoglm_jax.engine.core import EngineCore
from autoglm_jax.llm import LLM
from autoglm_jax.parallel.replica_processes import ProcessReplicatedEngineCore, ReplicaError
from autoglm_jax.parallel.replicas import data_parallel_backend
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.tokenizer import Tokenizer
from tests.hf_tiny import save_tiny

# page_size 16: the balance test counts 16-token pages (a short request takes 1, the long one 6)
ENGINE_ARGS = dict(compilation_cache_dir=None, warmup=False, show_progress=False, max_batch_size=4,
                   max_num_batched_tokens=16, decode_steps_per_call=4, dtype="float32", page_size=16)
MAX_LEN = 96
PROMPT_LENGTHS = (5, 23, 11, 40, 3)
MAX_TOKENS = (12, 6, 17, 9, 14)


def tiny_tokenizer() -> Tokenizer:
    """A byte-fallback BPE of ~300 tokens (id 2 = "</s>")."""
    backend = BackendTokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False, special_tokens=[
        "<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])
    backend.train_from_iterator(["Hello world, a quick test of words", "the the the end"] * 5, trainer)
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def workload(vocab_size: int):
    """Five greedy requests of skewed lengths, a text prompt with a stop string, then one sampled
    (no seed) with n=2."""
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(3, vocab_size, n).tolist()} for n in (*PROMPT_LENGTHS, 8)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    params.append(SamplingParams(temperature=1.0, n=2, max_tokens=7, ignore_eos=True))
    prompts.insert(5, "the quick test")
    params.insert(5, SamplingParams(temperature=0, max_tokens=12, stop=["e"], ignore_eos=True))
    return prompts, params


def tokens(outputs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in out.outputs] for out in outputs]


def replica_children():
    return [p for p in multiprocessing.active_children() if p.name.startswith("autoglm-dp-replica")]


def run_until(front, done, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the replicas did not get there in time"
        front.step()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-glm4-bpe")
    tokenizer = tiny_tokenizer()
    save_tiny("Glm4ForCausalLM", directory, seed=3, vocab_size=tokenizer.vocab_size)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def llm(model_dir):
    llm = LLM(model_dir, max_model_len=MAX_LEN, data_parallel_size=2, data_parallel_backend="process", **ENGINE_ARGS)
    yield llm
    llm.engine.close()


def test_auto_backend_is_thread_on_cpu_and_process_when_named():
    assert data_parallel_backend(EngineConfig(data_parallel_size=2)) == "thread"
    assert data_parallel_backend(EngineConfig(data_parallel_backend="process")) == "process"
    with pytest.raises(ValueError, match="data_parallel_backend='fork'"):
        EngineConfig(data_parallel_backend="fork")


def test_dp2_processes_give_one_engines_tokens(llm, model_dir):
    front = llm.engine
    assert isinstance(front, ProcessReplicatedEngineCore) and len(set(front.replica_pids)) == 2
    assert front.max_sequence_length == MAX_LEN and front.tokenizer.encode("the end") == [281, 306]
    assert os.getpid() not in front.replica_pids
    prompts, params = workload(front.model_config.vocab_size)
    got = llm.generate(prompts, params, use_tqdm=False)
    one = LLM.from_engine(EngineCore(model=model_dir, max_sequence_length=MAX_LEN, **ENGINE_ARGS))
    assert tokens(got) == tokens(one.generate(prompts, params, use_tqdm=False))
    assert [len(c[0][0]) for c in tokens(got)[:5]] == list(MAX_TOKENS)
    assert got[5].prompt == "the quick test" and got[5].outputs[0].text
    assert all(replica["num_finished"] > 0 for replica in front.metrics.snapshots)  # both replicas served
    metrics = front.metrics.snapshot(time.monotonic())
    generated = sum(len(c.token_ids) for out in got for c in out.outputs)
    assert metrics["num_finished"] == 8 and metrics["total_generated_tokens"] == generated
    assert front.allocator.utilization == 0.0 and front.scheduler.num_running == front.scheduler.num_waiting == 0


def test_burst_of_adds_spreads_before_the_replicas_report(llm):
    front = llm.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids = [front.add_request([3 + i, 4, 5], params).request_id for i in range(12)]
    placed = [front.requests[i].replica for i in ids]
    assert 4 <= placed.count(0) <= 8, placed
    assert front.scheduler.num_running + front.scheduler.num_waiting == 12
    for request_id in ids:
        assert front.abort(request_id)
    assert not front.has_unfinished_requests()
    run_until(front, lambda: front.allocator.num_free == front.allocator.num_usable_pages
              and front.scheduler.num_waiting == front.scheduler.num_running == 0)


def test_skewed_lengths_balance_kv_pages(llm):
    front = llm.engine
    long = front.add_request(list(range(3, 43)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    short = [front.add_request([7, 8, 9 + i], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
             for i in range(6)]  # 1 KV page each; the long one claims 6
    with_long = front.requests[long.request_id].replica
    beside_long = sum(front.requests[s.request_id].replica == with_long for s in short)
    assert beside_long <= 1, f"{beside_long} short requests joined the long one"
    finished = {}
    while front.has_unfinished_requests():
        finished.update({o.request_id: o for o in front.step() if o.finished})
    assert len(finished[long.request_id].outputs[0].token_ids) == 50
    assert all(len(finished[s.request_id].outputs[0].token_ids) == 4 for s in short)


def test_abort_of_a_request_running_in_a_replica(llm):
    front = llm.engine
    state = front.add_request(list(range(3, 20)), SamplingParams(temperature=0, max_tokens=70, ignore_eos=True))
    run_until(front, lambda: len(front.requests[state.request_id].output().outputs[0].token_ids) >= 4)
    remote = front.requests[state.request_id]
    assert front.abort(state.request_id) and not front.abort(state.request_id)
    final = remote.output()
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert 4 <= len(final.outputs[0].token_ids) < 70
    assert not front.has_unfinished_requests()
    seen = []
    run_until(front, lambda: seen.extend(front.step()) or front.allocator.num_free == front.allocator.num_usable_pages)
    assert all(o.request_id != state.request_id for o in seen)  # its pages freed in the replica, no late output


def test_bad_requests_raise_in_the_front_and_send_nothing(llm):
    front = llm.engine
    before = front.loads()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        front.add_request([1, 2, 600])
    with pytest.raises(ValueError, match="max_sequence_length=96"):
        front.add_request(list(range(3, 103)))
    with pytest.raises(ValueError, match="empty"):
        front.add_request("")
    with pytest.raises(TypeError, match="SamplingParams"):
        front.add_request([1, 2, 3], {"max_tokens": 3})
    with pytest.raises(ValueError, match="max_logprobs"):
        front.add_request([1, 2, 3], SamplingParams(logprobs=50))
    assert front.loads() == before and not front.has_unfinished_requests()


def test_autoglm_engine_over_the_process_front(llm):
    engine = AutoGLMEngine(llm.engine.config)
    engine.core = llm.engine  # reuse the running replicas
    engine.start()
    try:
        out = engine.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), timeout=60)
        assert out.finished and len(out.outputs[0].token_ids) == 5
        stream = engine.stream([9, 10, 11], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
        first = next(stream)
        stream.close()  # aborts the request in its replica
        assert not first.finished
        assert engine.metrics()["num_finished"] >= 9
    finally:
        engine.stop()
    assert not llm.engine.has_unfinished_requests()


def test_killed_replica_raises_instead_of_hanging(llm):
    front = llm.engine
    front.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    os.kill(front.replica_pids[1], signal.SIGKILL)
    with pytest.raises(ReplicaError, match=r"replica 1 \(pid \d+\) .*killed by SIGKILL"):
        run_until(front, lambda: False, timeout=30)
    with pytest.raises(ReplicaError, match="SIGKILL"):  # and at every later call
        front.step()


def test_close_leaves_no_replica_process(llm):
    pids = llm.engine.replica_pids
    llm.engine.close()
    llm.engine.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not replica_children()


def test_replica_failing_at_start_up_raises_its_traceback():
    with pytest.raises(ReplicaError, match=r"(?s)replica \d .* failed:.*tensor_parallel_size=3 does not divide"):
        ProcessReplicatedEngineCore(ENGINE_ARGS, model="tiny-glm4", data_parallel_size=2, tensor_parallel_size=3)
    assert not replica_children()


def test_replica_dying_at_start_up_raises_its_exit(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_no_such_flag_for_this_test=1")  # XLA exits at start-up
    with pytest.raises(ReplicaError, match=r"replica \d \(pid \d+\) exited with code"):
        ProcessReplicatedEngineCore(ENGINE_ARGS, model="tiny-glm4", data_parallel_size=2)
    assert not replica_children()
