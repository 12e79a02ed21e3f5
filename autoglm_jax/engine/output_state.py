"""Host-side output state of requests: detokenized text, stop decisions, logprobs, RequestOutput.

Owns: turning sampled token ids (and their logprobs) into what users see, per output sequence, and
grouping a request's n sequences into one ``RequestOutput``. It does not schedule or sample.
"""

from __future__ import annotations

import dataclasses
import time

from autoglm_jax.detokenizer import IncrementalDetokenizer
from autoglm_jax.engine.metrics import RequestMetrics
from autoglm_jax.engine.runner import PromptLogprob, SampledTokens
from autoglm_jax.outputs import CompletionOutput, RequestOutput, make_logprob_dict
from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.stop_checker import StopChecker


class SequenceState:
    """One of a request's n output sequences (one scheduler Request)."""

    def __init__(self, sequence_id: str, index: int, params: SamplingParams, prompt_token_ids, tokenizer,
                 eos_token_ids, max_model_len: int):
        self.sequence_id = sequence_id
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.stop = StopChecker(params, eos_token_ids, prompt_len=len(prompt_token_ids), max_model_len=max_model_len)
        # The ids that end it once min_tokens are generated (the decode loop's on-device stops).
        self.ending_token_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else tuple(eos_token_ids))
        self.detokenizer = None
        if tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer(
                tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens)
        self.finish_reason: str | None = None
        self.stop_reason = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, tokens: SampledTokens) -> int:
        """Accounts a step's sampled tokens in order until one finishes the sequence (later ones are not
        given); returns how many were taken."""
        if self.logprobs is not None:  # per-token logprob dicts: one token at a time
            for i in range(len(tokens.token_ids)):
                self._append_with_logprobs(tokens, i)
                if self.finished:
                    return i + 1
            return len(tokens.token_ids)
        taken, deltas = tokens.token_ids, None
        if self.detokenizer is not None:  # detokenize no token past one that finishes by a token rule
            if not self.params.stop:
                taken = taken[: self.stop.num_tokens_to_finish(taken)]
            deltas = self.detokenizer.add_each(taken)
        count = self.stop.update_many(taken, deltas)  # stop strings may end it earlier
        self.token_ids.extend(taken if count == len(taken) else taken[:count])
        for logprob in tokens.logprobs[:count]:
            self.cumulative_logprob += logprob
        self.text = self.stop.output_text
        if self.stop.finished:
            self.finish(self.stop.finish_reason, self.stop.stop_reason)
        return count

    def _append_with_logprobs(self, tokens: SampledTokens, i: int) -> None:
        token_id, logprob = tokens.token_ids[i], tokens.logprobs[i]
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        n, row = self.params.logprobs, tokens.row
        self.logprobs.append(make_logprob_dict(token_id, logprob, tokens.ranks[i], tokens.step_top_token_ids[row, i, :n],
                                               tokens.step_top_logprobs[row, i, :n], self._decode_one))
        delta = self.detokenizer.add(token_id) if self.detokenizer is not None else ""
        outcome = self.stop.update(token_id, delta)
        self.text = self.stop.output_text
        if outcome.finished:
            self.finish(outcome.finish_reason, outcome.stop_reason)

    def finish(self, reason: str, stop_reason=None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason = reason, stop_reason
            self.text = self.stop.output_text

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None else None

    def completion(self) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=self.text, token_ids=list(self.token_ids),
                                cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
                                logprobs=self.logprobs, finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclasses.dataclass
class RequestState:
    """A user's request: its prompt and n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    prompt_logprobs: list | None = None
    tokenizer: object = None
    sequence_metrics: dict[str, RequestMetrics] = dataclasses.field(default_factory=dict)  # by sequence id
    _prompt_list: list[int] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] + [None] * (len(self.prompt_token_ids) - 1)

    @property
    def finished(self) -> bool:
        for seq in self.sequences:  # a loop, not all(): asked for every request every step
            if seq.finish_reason is None:
                return False
        return True

    def add_prompt_logprobs(self, entries: list[PromptLogprob]) -> None:
        n = self.params.prompt_logprobs
        decode = (lambda t: self.tokenizer.decode([t], skip_special_tokens=False)) if self.tokenizer is not None else None
        for e in entries:
            self.prompt_logprobs[e.position] = make_logprob_dict(
                e.token_id, e.logprob, e.rank, e.top_token_ids[:n], e.top_logprobs[:n], decode)

    @property
    def metrics(self) -> RequestMetrics | None:
        """The request's latency figures over its finished sequences (None before the first; a
        sequence the scheduler failed with "error" has none)."""
        if not self.sequence_metrics:
            return None
        return merge_request_metrics(self.request_id, list(self.sequence_metrics.values()))

    def output(self) -> RequestOutput:
        """The cumulative RequestOutput. Its prompt_token_ids list (copied once) and prompt_logprobs are
        shared by all the request's outputs, as vLLM's; the completions' token_ids are copies."""
        if self._prompt_list is None:
            self._prompt_list = list(self.prompt_token_ids)
        finished = self.finished
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self._prompt_list,
                             prompt_logprobs=self.prompt_logprobs, outputs=[s.completion() for s in self.sequences],
                             finished=finished, metrics=self.metrics if finished else None)


def merge_request_metrics(request_id: str, parts: list[RequestMetrics]) -> RequestMetrics:
    """One request's figures from its n sequences': earliest queue exit and first token, latest finish,
    mean time per output token, tokens and preemptions summed. n == 1 gives that sequence's figures."""
    if len(parts) == 1:
        return dataclasses.replace(parts[0], request_id=request_id)

    def pick(name, choose):
        values = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return choose(values) if values else None

    return RequestMetrics(
        request_id=request_id, num_prompt_tokens=parts[0].num_prompt_tokens,
        num_output_tokens=sum(p.num_output_tokens for p in parts), queue_time_s=pick("queue_time_s", min),
        ttft_s=pick("ttft_s", min), tpot_s=pick("tpot_s", lambda v: sum(v) / len(v)),
        e2e_latency_s=pick("e2e_latency_s", max), num_preemptions=sum(p.num_preemptions for p in parts),
        finish_reason=parts[0].finish_reason)
