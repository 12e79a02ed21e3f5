"""StopChecker: vLLM's finish rules and text trimming, fed (token id, text delta) one token at a time."""

import numpy as np
import pytest

from autoglm_jax.sampling_params import SamplingParams
from autoglm_jax.stop_checker import StopChecker, find_stop_string

EOS = 2


def _feed(checker, pieces, first_id=100):
    """pieces: list of text, or (token_id, text). Returns (deltas, last result, tokens consumed)."""
    deltas, result = [], None
    for i, piece in enumerate(pieces):
        token_id, text = piece if isinstance(piece, tuple) else (first_id + i, piece)
        result = checker.update(token_id, text)
        deltas.append(result.text_delta)
        if result.finished:
            return deltas, result, i + 1
    return deltas, result, len(pieces)


def test_stop_string_spanning_tokens_is_found_and_trimmed():
    checker = StopChecker(SamplingParams(stop=["o Wor"], max_tokens=50), [EOS])
    deltas, result, used = _feed(checker, ["Hel", "lo W", "or", "ld!", " more"])
    assert used == 3
    assert (result.finish_reason, result.stop_reason) == ("stop", "o Wor")
    assert checker.output_text == "Hell" == "".join(deltas)


@pytest.mark.parametrize("include,expected", [(False, "abc"), (True, "abcSTOP")])
def test_text_after_stop_string_is_dropped(include, expected):
    checker = StopChecker(SamplingParams(stop="STOP", include_stop_str_in_output=include), [EOS])
    deltas, result, _ = _feed(checker, ["ab", "cSTOPde"])
    assert result.stop_reason == "STOP"
    assert checker.output_text == expected == "".join(deltas)


def test_first_stop_string_in_list_order_wins_as_in_vllm():
    checker = StopChecker(SamplingParams(stop=["world", "o"]), [EOS])
    _, result, _ = _feed(checker, ["hel", "lo world"])
    assert result.stop_reason == "world" and checker.output_text == "hello "


def test_old_text_is_not_searched_again():
    assert find_stop_string("STOPxyz", 1, ["STOP"], False) is None
    assert find_stop_string("xxSTO" + "P", 1, ["STOP"], False) == ("STOP", 2)
    assert find_stop_string("xxSTOP", 2, ["STOP"], True) == ("STOP", -1)


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_ids(include):
    checker = StopChecker(SamplingParams(stop_token_ids=[42], include_stop_str_in_output=include), [EOS])
    deltas, result, used = _feed(checker, ["a", "b", (42, "<s42>"), "c"])
    assert used == 3 and (result.finish_reason, result.stop_reason) == ("stop", 42)
    assert "".join(deltas) == ("ab<s42>" if include else "ab")


def test_eos_and_extra_eos_ids():
    checker = StopChecker(SamplingParams(), [EOS, 7])
    deltas, result, _ = _feed(checker, ["x", (EOS, "</s>")])
    assert (result.finish_reason, result.stop_reason) == ("stop", None) and "".join(deltas) == "x"
    checker = StopChecker(SamplingParams(), [EOS, 7])
    _, result, _ = _feed(checker, ["x", (7, "<eot>")])
    assert (result.finish_reason, result.stop_reason) == ("stop", 7)


def test_ignore_eos_continues_to_max_tokens():
    checker = StopChecker(SamplingParams(ignore_eos=True, max_tokens=4), [EOS, 7])
    deltas, result, used = _feed(checker, [(EOS, "A"), (7, "B"), "C", "D", "E"])
    assert used == 4 and result.finish_reason == "length" and result.stop_reason is None
    assert "".join(deltas) == "ABCD"


def test_min_tokens_suppresses_every_stop_until_reached():
    params = SamplingParams(min_tokens=3, stop=["S"], stop_token_ids=[42], max_tokens=20)
    checker = StopChecker(params, [EOS])
    deltas, result, used = _feed(checker, [(EOS, "e"), (42, "S"), "aS", "Sb"])
    # Tokens 1-3 cannot stop (EOS / stop id / stop strings); the 4th finds a new "S".
    assert used == 4 and result.stop_reason == "S"
    assert checker.output_text == "eSaS"
    checker = StopChecker(params, [EOS])
    _, result, used = _feed(checker, ["a", "b", (EOS, "")])
    assert used == 3 and result.finish_reason == "stop"  # token stops from num_output == min_tokens (vLLM)


def test_max_tokens_length_and_stop_string_override():
    checker = StopChecker(SamplingParams(max_tokens=3), [EOS])
    _, result, used = _feed(checker, ["a", "b", "c", "d"])
    assert used == 3 and result.finish_reason == "length"
    checker = StopChecker(SamplingParams(max_tokens=3, stop=["c"]), [EOS])
    _, result, used = _feed(checker, ["a", "b", "xcy"])
    assert (result.finish_reason, result.stop_reason) == ("stop", "c") and checker.output_text == "abx"


def test_model_length_cap():
    checker = StopChecker(SamplingParams(max_tokens=None), [EOS], prompt_len=10, max_model_len=12)
    _, result, used = _feed(checker, ["a", "b", "c"])
    assert used == 2 and result.finish_reason == "length"


def test_streaming_holds_back_possible_stop_prefix():
    checker = StopChecker(SamplingParams(stop=["<END>"], max_tokens=5), [EOS])
    deltas, result, _ = _feed(checker, ["hello", " wor", "ld <EN", "X> ok", "!"])
    # The last len("<END>") - 1 = 4 characters are held back while running: "<EN" is not streamed
    # until the next token shows it is not a stop string.
    assert deltas[:4] == ["h", "ello", " world", " <ENX"]
    assert result.finish_reason == "length" and deltas[4] == "> ok!"
    assert "".join(deltas) == checker.output_text == "hello world <ENX> ok!"


def test_update_after_finish_raises():
    checker = StopChecker(SamplingParams(max_tokens=1), [EOS])
    assert checker.update(5, "a").finished
    with pytest.raises(RuntimeError, match="after the sequence finished"):
        checker.update(6, "b")


def test_random_splits_match_single_stop_reference():
    rng = np.random.default_rng(1234)
    for case in range(300):
        text = "".join(rng.choice(list("abc"), size=int(rng.integers(1, 30))))
        stop = "".join(rng.choice(list("abc"), size=int(rng.integers(1, 4))))
        include = bool(rng.integers(2))
        cuts = sorted(set(rng.integers(0, len(text) + 1, size=int(rng.integers(0, 8))).tolist()) | {0, len(text)})
        pieces = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        checker = StopChecker(SamplingParams(stop=[stop], include_stop_str_in_output=include, max_tokens=None), [EOS])
        deltas, result, _ = _feed(checker, pieces)
        found = text.find(stop)
        if found == -1:
            assert not result.finished and checker.output_text == text, case
            continue
        assert result.stop_reason == stop, case
        assert checker.output_text == text[: found + (len(stop) if include else 0)], case
        assert "".join(deltas) == checker.output_text, case
        if not include:
            assert all(stop not in d for d in deltas), case
