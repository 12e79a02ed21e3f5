"""Host-side pieces of the server, without a model: stream deltas, logprob formats, request checks, metrics."""

from __future__ import annotations

import random

import pytest

from autoglm_jax.outputs import CompletionOutput, Logprob, RequestOutput
from autoglm_jax.server.chat import template_message
from autoglm_jax.server.config import ServerConfig
from autoglm_jax.server.errors import APIError
from autoglm_jax.server.logprobs import MIN_LOGPROB, chat_logprobs, completion_logprobs
from autoglm_jax.server.metrics import ServerMetrics
from autoglm_jax.server.protocol import ChatCompletionRequest, ChatMessage
from autoglm_jax.server.sampling import check_request, resolve_max_tokens, sampling_params
from autoglm_jax.server.streaming import ChoiceDeltas


def _position(token_id: int, rng: random.Random) -> dict[int, Logprob]:
    values = sorted((-rng.random() * 5 for _ in range(3)), reverse=True)
    return {token_id: Logprob(values[1], rank=2, decoded_token=f"<{token_id}>"),
            100 + token_id: Logprob(values[0], rank=1, decoded_token="best"),
            200 + token_id: Logprob(values[2], rank=3, decoded_token="third")}


def _growing_outputs(rng: random.Random, n: int) -> list[RequestOutput]:
    """Cumulative outputs of n choices growing by random amounts and finishing at random steps."""
    texts, ids = [""] * n, [[] for _ in range(n)]
    finish = [None] * n
    outputs = []
    while not all(finish):
        for i in range(n):
            if finish[i] is None:
                new_ids = [rng.randrange(50) for _ in range(rng.randrange(0, 4))]
                ids[i] = ids[i] + new_ids
                texts[i] += "".join(chr(97 + rng.randrange(26)) for _ in range(rng.randrange(0, 5)))
                if rng.random() < 0.2:
                    finish[i] = rng.choice(["stop", "length"])
        choices = [CompletionOutput(i, texts[i], list(ids[i]), None, [_position(t, rng) for t in ids[i]],
                                    finish[i]) for i in range(n)]
        outputs.append(RequestOutput("r", None, [1, 2], None, choices, all(finish)))
    return outputs


@pytest.mark.parametrize("seed", range(5))
def test_deltas_reassemble_each_choice_and_finish_once(seed):
    rng = random.Random(seed)
    outputs = _growing_outputs(rng, n=2)
    deltas = ChoiceDeltas(2)
    text, tokens, finishes = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for output in outputs:
        for delta in deltas.update(output):
            assert delta.text_offset == len(text[delta.index])
            assert len(delta.logprobs) == len(delta.token_ids)
            assert all(token in position for token, position in zip(delta.token_ids, delta.logprobs))
            text[delta.index] += delta.text
            tokens[delta.index] += delta.token_ids
            finishes[delta.index] += [delta.finish_reason] if delta.finish_reason else []
    for choice in outputs[-1].outputs:
        assert text[choice.index] == choice.text
        assert tokens[choice.index] == choice.token_ids
        assert finishes[choice.index] == [choice.finish_reason]
    assert deltas.update(outputs[-1]) == []


def test_chat_logprobs_top_sorted_limited_and_clamped():
    rng = random.Random(0)
    positions = [_position(7, rng), {9: Logprob(float("-inf"), rank=5, decoded_token="é")}]
    entries = chat_logprobs([7, 9], positions, top_k=2, token_text=str)
    assert [t.token for t in entries[0].top_logprobs] == ["best", "<7>"]
    assert entries[0].logprob == positions[0][7].logprob
    assert entries[1].logprob == MIN_LOGPROB and entries[1].top_logprobs == []
    assert entries[1].bytes == list("é".encode())


def test_completion_logprobs_offsets_accumulate():
    rng = random.Random(1)
    result = completion_logprobs([3, 4, 5], [_position(t, rng) for t in (3, 4, 5)], top_k=1, token_text=str,
                                 text_offset=10)
    assert result.tokens == ["<3>", "<4>", "<5>"]
    assert result.text_offset == [10, 13, 16]
    assert all(list(top) == ["best"] for top in result.top_logprobs)


def test_resolve_max_tokens():
    assert resolve_max_tokens(None, 100, 512, "prompt") == 412
    assert resolve_max_tokens(412, 100, 512, "prompt") == 412
    with pytest.raises(APIError, match="requested 513 tokens") as error:
        resolve_max_tokens(413, 100, 512, "prompt")
    assert error.value.status == 400 and error.value.param == "max_tokens"
    with pytest.raises(APIError, match="no room"):
        resolve_max_tokens(None, 512, 512, "messages")


def test_template_message_joins_text_and_refuses_images():
    message = ChatMessage(role="developer", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert template_message(0, message, "m") == {"role": "system", "content": "a\nb"}
    with pytest.raises(APIError, match="text-only") as error:
        template_message(2, ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}]), "m")
    assert error.value.status == 400 and error.value.param == "messages[2].content[0].type"


def test_request_checks():
    config = ServerConfig(served_model_name="m", max_n=4)
    user = [{"role": "user", "content": "x"}]
    with pytest.raises(APIError) as error:
        check_request(ChatCompletionRequest(model="other", messages=user), config)
    assert error.value.status == 404
    with pytest.raises(APIError, match="n=5"):
        check_request(ChatCompletionRequest(messages=user, n=5), config)
    with pytest.raises(APIError, match="greedy"):
        sampling_params(ChatCompletionRequest(messages=user, n=2, temperature=0), max_tokens=4, logprobs=None)
    params = sampling_params(ChatCompletionRequest(messages=user, stop="x", seed=3), max_tokens=4, logprobs=2)
    assert (params.temperature, params.top_p, params.stop, params.seed, params.logprobs) == (1.0, 1.0, ["x"], 3, 2)
    with pytest.raises(ValueError):
        ServerConfig(served_model_name="")


class _NoEngine:
    core = None  # the gauge collector reads nothing from an engine that is not loaded


def _sample(metrics: ServerMetrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_request_timer_records_latencies_tokens_and_finish_reasons():
    metrics = ServerMetrics(_NoEngine())
    outputs = _growing_outputs(random.Random(3), n=2)
    timer = metrics.timer(num_choices=2)
    for output in outputs:
        timer.observe(output)
    timer.finish()
    final = outputs[-1]
    assert _sample(metrics, "autoglm_generation_tokens_total") == sum(len(c.token_ids) for c in final.outputs)
    assert _sample(metrics, "autoglm_prompt_tokens_total") == 2
    reasons = [c.finish_reason for c in final.outputs]
    for reason in set(reasons):
        assert _sample(metrics, "autoglm_request_success_total", {"finish_reason": reason}) == reasons.count(reason)
    assert _sample(metrics, "autoglm_e2e_request_latency_seconds_count") == 1
    assert _sample(metrics, "autoglm_time_to_first_token_seconds_count") == 1

    aborted = metrics.timer(num_choices=3)
    aborted.finish()  # left before its first output: every choice counts as aborted
    assert _sample(metrics, "autoglm_request_success_total", {"finish_reason": "abort"}) == 3
    assert b"autoglm_e2e_request_latency_seconds_bucket" in metrics.render()
