"""SlotInputs (engine.runner): the page-table, sampling and stop-id rows the runner keeps per batch slot
across steps equal what a fresh build from each step's entries gives, through admissions, page growth,
multi-step lookahead, preemptions, finishes and aborts. No device model: a real Scheduler drives it."""

from __future__ import annotations

import random

import numpy as np

from autoglm_jax.engine.page_allocator import PageAllocator
from autoglm_jax.engine.request import FinishReason, Request
from autoglm_jax.engine.runner import STOP_IDS_WIDTH, RowRequest, SlotInputs
from autoglm_jax.engine.scheduler import Scheduler, SchedulerConfig
from autoglm_jax.sampler import SamplingTensors
from autoglm_jax.sampling_params import SamplingParams

EOS = (1, 2)
MAX_PAGES = 12
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=6),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, max_tokens=9, min_tokens=3, stop_token_ids=[7, 8]),
    SamplingParams(temperature=1.2, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1,
                   max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.3, max_tokens=4, min_tokens=4, seed=11),
]


def fresh_page_table(scheduled, num_rows: int) -> np.ndarray:
    table = np.zeros((num_rows, MAX_PAGES), np.int32)
    for b, seq in enumerate(scheduled):
        table[b, : len(seq.page_ids)] = seq.page_ids
    return table


def fresh_stop_ids(scheduled, rows, num_rows: int) -> np.ndarray:
    stop_ids = np.full((num_rows, STOP_IDS_WIDTH), -1, np.int32)
    for b, seq in enumerate(scheduled):
        ids = rows[seq.request_id].stop_ids[:STOP_IDS_WIDTH]
        stop_ids[b, : len(ids)] = ids
    return stop_ids


def fresh_sampling(scheduled, rows, num_rows: int) -> SamplingTensors:
    chosen = [rows[seq.request_id] for seq in scheduled]
    return SamplingTensors.from_params([r.sampling_params for r in chosen], [r.seed for r in chosen],
                                       [r.num_generated for r in chosen], num_rows, EOS, stop_ids_width=STOP_IDS_WIDTH)


def row_of(request: Request, seq, seeds: dict, ending_ids: dict, rng: random.Random) -> RowRequest:
    """What the engine passes for a scheduled entry (its stop ids: the same tuple object each step, or at
    random an equal copy, as the runner must accept both)."""
    params = request.sampling_params
    num_generated = request.num_output_tokens + max(0, seq.end_position - request.num_tokens)
    stop_ids = ending_ids[request.request_id] if num_generated >= params.min_tokens else ()
    if stop_ids and rng.random() < 0.3:
        stop_ids = tuple(list(stop_ids))
    return RowRequest(params, seeds[request.request_id], num_generated, request.num_prompt_tokens, (), 1, stop_ids)


def check_rows(slot_inputs: SlotInputs, scheduled, rows, num_rows: int) -> None:
    slots = slot_inputs.update(scheduled, rows)
    assert slots == [seq.slot for seq in scheduled]
    index = slot_inputs.index(slots, num_rows)
    np.testing.assert_array_equal(slot_inputs.page_table[index], fresh_page_table(scheduled, num_rows))
    np.testing.assert_array_equal(slot_inputs.stop_ids[index], fresh_stop_ids(scheduled, rows, num_rows))
    got = slot_inputs.sampling_tensors(index, [rows[seq.request_id].num_generated for seq in scheduled])
    want = fresh_sampling(scheduled, rows, num_rows)
    for name in SamplingTensors.__dataclass_fields__:
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_slot_rows_equal_a_fresh_build_through_a_random_workload():
    rng = random.Random(0)
    # 10 usable pages of 2 tokens for 4 slots of up to 24 tokens: pages run out, requests get preempted.
    config = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=8, page_size=2, max_sequence_length=24)
    scheduler = Scheduler(config, PageAllocator(11, 2))
    slot_inputs = SlotInputs(4, MAX_PAGES, EOS, STOP_IDS_WIDTH)
    seeds, ending_ids, steps_checked, aborted, stopped = {}, {}, 0, 0, 0
    for step in range(400):
        if rng.random() < 0.3 and scheduler.num_waiting < 4:
            request_id = f"r{step}"
            params = rng.choice(PARAMS)
            scheduler.add_request(Request(request_id, [rng.randrange(3, 500) for _ in range(rng.randint(1, 9))],
                                          params, arrival_time=0.0))
            seeds[request_id] = rng.randrange(1 << 40)
            ending_ids[request_id] = tuple(params.stop_token_ids) + (() if params.ignore_eos else EOS)
        output = scheduler.schedule(rng.choice([0, 0, 3]))
        if output.scheduled:
            requests = {seq.request_id: scheduler.get_request(seq.request_id) for seq in output.scheduled}
            rows = {i: row_of(requests[i], seq, seeds, ending_ids, rng)
                    for i, seq in ((s.request_id, s) for s in output.scheduled)}
            check_rows(slot_inputs, output.scheduled, rows, num_rows=rng.choice([4, 8]))
            steps_checked += 1
        sampled = {seq.request_id: [rng.randrange(3, 500) for _ in range(1 + rng.randint(0, seq.num_lookahead_tokens))]
                   for seq in output.scheduled if seq.sample}
        scheduler.update(sampled)
        running = list(scheduler.running)
        if running and rng.random() < 0.08:
            scheduler.abort(rng.choice(running).request_id)
            aborted += 1
        elif running and rng.random() < 0.08:
            scheduler.finish(rng.choice(running).request_id, FinishReason.STOP)
            stopped += 1
    assert steps_checked > 200 and scheduler.num_preemptions > 5 and aborted and stopped, (
        f"{steps_checked} steps, {scheduler.num_preemptions} preemptions, {aborted} aborts, {stopped} stops")


def test_a_slot_taken_by_a_shorter_sequence_is_cleared_past_its_pages():
    slot_inputs = SlotInputs(2, 6, EOS)
    params = SamplingParams(temperature=0.0)

    def write(request_id: str, pages: tuple[int, ...]) -> np.ndarray:
        from autoglm_jax.engine.scheduler_output import ScheduledSequence

        seq = ScheduledSequence(request_id, 1, (5,), 0, pages, True, False, True)
        rows = {request_id: RowRequest(params, 0, 0, 1, (), 1, ())}
        return slot_inputs.page_table[slot_inputs.index(slot_inputs.update([seq], rows), 1)][0]

    np.testing.assert_array_equal(write("a", (3, 4, 5)), [3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(write("a", (3, 4, 5, 9)), [3, 4, 5, 9, 0, 0])  # grown: the tail only
    np.testing.assert_array_equal(write("b", (3, 7)), [3, 7, 0, 0, 0, 0])  # another sequence: rewritten
    np.testing.assert_array_equal(slot_inputs.page_table[2], np.zeros(6))  # the padding row stays empty
