"""Load on a live `stillroom serve` of a tiny LM and a tiny generator: no errors, micro-batching active.

The default run holds 16 clients for 5 s per artifact; ``-m slow`` holds 64 clients for 30 s each.
p50 / p99 are printed (run with -s) and recorded as junit properties.
"""

from __future__ import annotations

import httpx
import pytest

from benchmarks.soak import soak, table
from tests.faults.conftest import serve

SERVER_ARGS = ("--max-batch", "32", "--max-wait-ms", "10", "--max-tokens-limit", "16")


def held(art, kind: str, clients: int, seconds: float, tmp_path, record_property) -> dict:
    with serve(art, tmp_path / kind, *SERVER_ARGS) as server:
        result = soak(server.url, kind, clients, seconds)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    print("\n" + table([result]))
    record_property(f"soak_{kind}", {k: v for k, v in result.items() if k != "batch_histogram"})
    assert result["errors"] == 0, result["first_errors"]
    assert result["ok"] >= clients  # every client got answers
    assert result["multi_item_batches"] > 0, result["batch_histogram"]  # batches formed under load
    assert result["seconds"] >= seconds
    return result


@pytest.mark.parametrize("kind", ["causal-lm", "generator"])
def test_short_load_no_errors_and_batching(kind, lm_art, gen_art, tmp_path, record_property):
    held(lm_art if kind == "causal-lm" else gen_art, kind, 16, 5.0, tmp_path, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal-lm", "generator"])
def test_soak_64_clients_30s(kind, lm_art, gen_art, tmp_path, record_property):
    held(lm_art if kind == "causal-lm" else gen_art, kind, 64, 30.0, tmp_path, record_property)
