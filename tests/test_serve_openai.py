"""`stillroom serve` through the official `openai` client: every parameter it sends is honoured or
refused with a 400 naming it, never silently ignored."""

from __future__ import annotations

import math

import openai
import pytest

from tests.test_serve_http import _greedy_text, _serve
from tests.test_serve_runtime import lm_artifact, lm_pair  # noqa: F401 - fixtures

KEY = "k3y"


@pytest.fixture(scope="module")
def client(lm_artifact):  # noqa: F811
    model, thread = _serve(lm_artifact, api_key=KEY, max_tokens_limit=64)
    with thread:
        yield model, openai.OpenAI(base_url=thread.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_list_and_retrieve(client):
    _, c = client
    (listed,) = c.models.list().data
    assert c.models.retrieve("tiny-student").id == listed.id == "tiny-student" and listed.created > 0
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")


def test_completion_limits_n_seed_echo_and_fingerprint(client):
    model, c = client
    r = c.completions.create(model="tiny-student", prompt="To be", max_tokens=5, temperature=0)
    assert r.choices[0].text == _greedy_text(model, "To be", 5) and r.created > 0
    assert r.system_fingerprint and r.usage.completion_tokens <= 5
    many = c.completions.create(
        model="tiny-student", prompt="To be", max_tokens=6, n=3, temperature=1.0, seed=7
    )
    again = c.completions.create(
        model="tiny-student", prompt="To be", max_tokens=6, n=3, temperature=1.0, seed=7
    )
    assert len(many.choices) == 3 and [x.text for x in many.choices] == [x.text for x in again.choices]
    echo = c.completions.create(model="tiny-student", prompt="To be", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text == "To be" + _greedy_text(model, "To be", 3)


def test_completion_logprobs_are_the_models(client):
    model, c = client
    r = c.completions.create(model="tiny-student", prompt="No more", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert (
            len(top) == 2 and chosen <= 0 and math.isclose(chosen, max(top.values()), abs_tol=1e-9)
        )  # greedy
    ids = model.encode("No more")
    logits = model.full_logits([ids])[0, -1].astype("float64")
    expected = logits.max() - logits.max() - math.log(sum(math.exp(z - logits.max()) for z in logits))
    assert lp.token_logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_penalties_change_the_text_and_stop_strings_cut_it(client):
    model, c = client
    plain = _greedy_text(model, "The", 24)
    penalised = c.completions.create(
        model="tiny-student",
        prompt="The",
        max_tokens=24,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    ).choices[0]
    assert penalised.text != plain  # a tiny model repeats itself greedily; the penalties must bite
    stop = plain[3:6]
    cut = c.completions.create(
        model="tiny-student", prompt="The", max_tokens=24, temperature=0, stop=[stop, "zzz"]
    )
    assert cut.choices[0].text == plain[: plain.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_content_parts_completion_tokens_and_logprobs(client):
    model, c = client
    parts = [{"type": "text", "text": "To be,"}, {"type": "text", "text": "or not"}]
    r = c.chat.completions.create(
        model="tiny-student",
        messages=[{"role": "user", "content": parts}],
        max_completion_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    plain = c.chat.completions.create(
        model="tiny-student",
        messages=[{"role": "user", "content": "To be,\nor not"}],
        max_tokens=4,
        temperature=0,
    )
    assert r.choices[0].message.content == plain.choices[0].message.content and r.usage.completion_tokens <= 4
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert plain.choices[0].logprobs is None


def test_streams_end_with_the_usage_chunk(client):
    model, c = client
    chunks = list(
        c.chat.completions.create(
            model="tiny-student",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None  # OpenAI's shape of the usage chunk
    assert all(ch.usage is None for ch in body)
    text = "".join(ch.choices[0].delta.content or "" for ch in body)
    full = c.chat.completions.create(
        model="tiny-student", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0
    )
    assert text == full.choices[0].message.content and last.usage == full.usage


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(client, extra, param):
    _, c = client
    args = {
        "model": "tiny-student",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        **extra,
    }
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(**args)
    assert err.value.param is not None and err.value.param.startswith(param), err.value.body


def test_top_p_user_and_a_single_stop_string(client):
    model, c = client
    greedy = _greedy_text(model, "The king", 8)
    # top_p so small that only the most likely token is left: sampling at T=1 becomes greedy
    narrow = c.completions.create(
        model="tiny-student", prompt="The king", max_tokens=8, temperature=1.0, top_p=1e-9, seed=1, user="u-1"
    )
    assert narrow.choices[0].text == greedy
    stop = greedy[2:4]
    cut = c.completions.create(
        model="tiny-student", prompt="The king", max_tokens=8, temperature=0, stop=stop
    )
    assert cut.choices[0].text == greedy[: greedy.index(stop)]
