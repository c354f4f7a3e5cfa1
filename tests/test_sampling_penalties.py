"""OpenAI's presence / frequency penalties and reported logprobs, against their plain definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stillroom.plugins.lm.sampling import SamplingParams, penalize, top_logprobs


def test_penalties_follow_openais_formula():
    logits = np.array([1.0, 2.0, 3.0, 4.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(logits, [3, 3, 1, 3], params)
    # z_j - c_j * frequency - [c_j > 0] * presence, token by token
    expected = [1.0, 2.0 - 1 * 0.25 - 0.5, 3.0, 4.0 - 3 * 0.25 - 0.5]
    np.testing.assert_allclose(out, expected)
    assert out is not logits and logits[3] == 4.0  # the engine's buffer is not written to


def test_no_penalty_or_no_history_returns_the_logits_untouched():
    logits = np.array([1.0, 2.0])
    assert penalize(logits, [0, 1], SamplingParams()) is logits
    assert penalize(logits, [], SamplingParams(presence_penalty=1.0)) is logits


def test_negative_penalties_encourage_repeats_and_ranges_are_checked():
    out = penalize(np.zeros(3), [2], SamplingParams(presence_penalty=-1.0))
    assert int(np.argmax(out)) == 2
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logprobs": 21}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_top_logprobs_are_the_log_softmax():
    logits = np.array([0.5, 3.0, -1.0, 2.0, 2.0])
    total = sum(math.exp(z) for z in logits)
    chosen, top = top_logprobs(logits, 2, 3)
    assert chosen == pytest.approx(-1.0 - math.log(total))
    assert [i for i, _ in top] == [1, 3, 4]  # most likely first; ties in id order
    for i, lp in top:
        assert lp == pytest.approx(logits[i] - math.log(total))
    assert top_logprobs(logits, 1, 0)[1] == []
    assert len(top_logprobs(logits, 1, 9)[1]) == 5  # k above the vocabulary: all of it
