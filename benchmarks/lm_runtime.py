"""LM inference on CPU: PyTorch eager vs the stillroom engine (fp32, MatMulNBits int8/int4) vs ORT-genai.

One run, one table. Every engine decodes greedy on the same weights with the same thread count:

- tok/s b1: 64 new tokens after a 16-token prompt, decode steps only (prefill excluded), median of rounds;
- tok/s b8: 8 equal-length prompts, 8 x 64 tokens / decode time;
- TTFT: prefill of a 128-token prompt to the first token (batch 1);
- agree: position-wise greedy agreement with PyTorch fp32 over the b1 continuations;
- bound: measured read bandwidth / weight bytes read per decoded token (fp32 weights, the tied table once);
  bandwidth is measured at the start of every round and the best round's is used, and "best % of fp32
  bound" compares it with each engine's best round (on a shared machine the median is load, not code).

Without ``--model`` the model is SmolLM2-135M-shaped (30 layers, hidden 576, 9 / 3 heads, MLP 1536, vocab
49152, tied; random weights: speed only), and a second table measures quality on the embedded teacher
(``stillroom/data/lm_teacher``): greedy agreement of each variant with PyTorch fp32 over 64-token
continuations of 64 held-out 8-token prompts (one early flip between near-tied tokens changes the rest
of a continuation, so a handful of prompts gives a noisy number), the teacher-forced top-1 agreement
(argmax equal at every position of held-out text: the per-token fidelity without that cascade), and
held-out perplexity with its delta.

    OMP_NUM_THREADS=2 python benchmarks/lm_runtime.py [--model HF_DIR] [--threads 2] [--rounds 3]

onnxruntime-genai (``pip install onnxruntime-genai``) is optional; its graph is built by its own model
builder from the same directory (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NEW, PROMPT, LONG, BATCH = 64, 16, 128, 8


# -- the models ---------------------------------------------------------------------------------
def build_smollm_shaped(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(REPO / "stillroom" / "data" / "lm_teacher").save_pretrained(out)
    return out


def build_graphs(model, out: Path, schemes=("int8", "int4")) -> dict[str, Path]:
    """fp32 fused graph plus its weight-only variants (validated in tests; measured here)."""
    from stillroom.plugins.lm.export import fused_graph
    from stillroom.plugins.lm.export.weight_only import quantize_weight_only

    out.mkdir(parents=True, exist_ok=True)
    graphs = {"fp32": out / "fp32.onnx"}
    if not graphs["fp32"].is_file():
        fused_graph.export_fused(model, graphs["fp32"])
    for scheme in schemes:
        graphs[scheme] = out / f"{scheme}.onnx"
        if not graphs[scheme].is_file():
            quantize_weight_only(graphs["fp32"], graphs[scheme], scheme)
    return graphs


def build_genai(model_dir: Path, out: Path) -> Path | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    if not (out / "genai_config.json").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai_cache")]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return out


# -- engines: each returns (tokens [B, NEW], seconds to first token, seconds of decode after it) ----
class TorchEngine:
    def __init__(self, model) -> None:
        self.model = model

    def run(self, prompts: np.ndarray, new: int):
        import torch

        ids = torch.from_numpy(prompts)
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter()
            tokens, cache = [token], out.past_key_values
            for _ in range(new - 1):
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                token, cache = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
                tokens.append(token)
            end = time.perf_counter()
        return torch.cat(tokens, 1).numpy(), first - start, end - first


def greedy(lm, prompts: np.ndarray, new: int):
    """The decode loop every stillroom caller uses, greedy, stop tokens ignored."""
    from stillroom.plugins.lm.decode_loop import Generation
    from stillroom.plugins.lm.sampling import SamplingParams

    params = [SamplingParams(max_tokens=new, ignore_eos=True)] * prompts.shape[0]
    return Generation(lm, prompts.tolist(), params, pad_id=0).run()


class FastEngine:
    def __init__(self, graph: Path, threads: int, spin: bool) -> None:
        from stillroom.core.ort_session import SessionOptions
        from stillroom.plugins.lm.engine import open_engine

        self.lm = open_engine(graph, "fused", SessionOptions.decode(threads=threads, spin=spin))

    def run(self, prompts: np.ndarray, new: int):
        gen = greedy(self.lm, prompts, new)
        return np.asarray(gen.outputs), gen.ttft_s, gen.total_s - gen.ttft_s


class GenaiEngine:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime_genai as og

        config = json.loads((path / "genai_config.json").read_text())
        options = config["model"]["decoder"]["session_options"]
        options["intra_op_num_threads"] = threads
        (path / "genai_config.json").write_text(json.dumps(config, indent=1))
        self.og, self.model = og, og.Model(str(path))

    def run(self, prompts: np.ndarray, new: int):
        params = self.og.GeneratorParams(self.model)
        total = prompts.shape[1] + new
        params.set_search_options(
            max_length=total, min_length=total, do_sample=False, batch_size=prompts.shape[0]
        )  # min_length: no early stop on a random model's EOS, so every engine decodes ``new`` tokens
        gen = self.og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(prompts.astype(np.int32))  # the prefill (the first pick is a cheap argmax)
        first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        end = time.perf_counter()
        seqs = [np.asarray(gen.get_sequence(row))[prompts.shape[1] :] for row in range(prompts.shape[0])]
        return np.stack(seqs), first - start, end - first


# -- measurements -------------------------------------------------------------------------------
def read_bandwidth_gbs(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Best of ``repeats`` reads of a ``mib`` MiB float32 buffer (torch.sum over ``threads`` threads)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(mib * (1 << 20) // 4)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes_per_token(model) -> int:
    """fp32 bytes read per decoded token: every parameter once (a tied table counts once, as lm_head)."""
    return sum(p.numel() for p in model.parameters()) * 4


def speed_rows(
    engines: dict, rounds: int, vocab: int, reference: np.ndarray | None, threads: int, bandwidth: list
) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    b1 = rng.integers(1, min(vocab, 4000), size=(1, PROMPT)).astype(np.int64)
    b8 = rng.integers(1, min(vocab, 4000), size=(BATCH, PROMPT)).astype(np.int64)
    long = rng.integers(1, min(vocab, 4000), size=(1, LONG)).astype(np.int64)
    results: dict[str, dict] = {name: {"b1": [], "b8": [], "ttft": []} for name in engines}
    tokens: dict[str, np.ndarray] = {}
    for _ in range(rounds):  # round-robin so background load hits every engine alike
        bandwidth.append(read_bandwidth_gbs(threads))
        for name, engine in engines.items():
            got, _, decode = engine.run(b1, NEW)
            tokens[name] = got
            results[name]["b1"].append((NEW - 1) / decode)
            _, _, decode = engine.run(b8, NEW)
            results[name]["b8"].append(BATCH * (NEW - 1) / decode)
            results[name]["ttft"].append(engine.run(long, 1)[1])
    ref = tokens.get("pytorch eager fp32") if reference is None else reference
    rows = {}
    for name, r in results.items():
        rows[name] = {
            "tok/s b1": statistics.median(r["b1"]),
            "best b1": max(r["b1"]),
            "tok/s b8": statistics.median(r["b8"]),
            "TTFT 128 (ms)": 1000 * statistics.median(r["ttft"]),
            "agree": float((tokens[name] == ref).mean()) if ref is not None else float("nan"),
            "b1 all rounds": [round(x, 1) for x in r["b1"]],
        }
    return rows


def quality_rows(
    model, tokenizer, graphs: dict[str, Path], threads: int, n_prompts: int = 64
) -> dict[str, dict]:
    """Greedy agreement with PyTorch fp32 (64-token continuations) and held-out perplexity per variant."""
    from stillroom.core.ort_session import SessionOptions
    from stillroom.data import heldout_text
    from stillroom.plugins.lm.engine import open_engine
    from stillroom.plugins.lm.export.validation import BLOCK, torch_greedy, torch_logits

    text = heldout_text()
    lines = [ln for ln in text.splitlines() if len(ln.split()) >= 6]
    prompts = [p[:8] for ln in lines if len(p := tokenizer(ln)["input_ids"]) >= 8][:n_prompts]
    prompts = np.asarray(prompts, np.int64)
    ref = torch_greedy(model, prompts, np.ones_like(prompts), NEW)
    ids = np.asarray(tokenizer(text)["input_ids"][: BLOCK * 8], np.int64).reshape(8, BLOCK)

    def ppl(logits: np.ndarray) -> float:
        z = logits[:, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(np.exp(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean()))

    ref_logits = torch_logits(model, ids, np.ones_like(ids))
    base = ppl(ref_logits)
    rows = {"pytorch eager fp32": {"agree": 1.0, "top-1 forced": 1.0, "perplexity": base, "ppl delta": 0.0}}
    for name, graph in graphs.items():
        lm = open_engine(graph, "fused", SessionOptions.decode(threads=threads))
        got = np.asarray(greedy(lm, prompts, NEW).outputs)
        logits = lm.full_logits(ids)
        value = ppl(logits)
        rows[f"stillroom {name}"] = {
            "agree": float((got == ref).mean()),
            "top-1 forced": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
            "perplexity": value,
            "ppl delta": (value - base) / base,
        }
    return rows


def table(title: str, rows: dict[str, dict]) -> str:
    cols = list(next(iter(rows.values())).keys())
    lines = [f"\n{title}", "| engine | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a transformers Llama/Mistral/Qwen2 directory")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 2))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="where graphs are built (kept between runs)")
    parser.add_argument(
        "--skip-torch", action="store_true", help="leave PyTorch eager out of the speed table"
    )
    parser.add_argument(
        "--spin", choices=("auto", "on", "off"), default="auto",
        help="spin-waiting of stillroom's idle ORT threads (auto: only while the cores are free)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.core.ort_session import spin_waiting

    spin = spin_waiting({"auto": None, "on": True, "off": False}[args.spin], args.threads)  # decided once
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="lm_runtime_"))
    model_dir = args.model or build_smollm_shaped(work / "smollm2-shaped")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    graphs = build_graphs(model, work / "graphs")
    engines: dict = {} if args.skip_torch else {"pytorch eager fp32": TorchEngine(model)}
    engines.update({f"stillroom {k}": FastEngine(v, args.threads, spin) for k, v in graphs.items()})
    genai = build_genai(model_dir, work / "genai_fp32")
    if genai is not None:
        engines["onnxruntime-genai fp32"] = GenaiEngine(genai, args.threads)
    per_token = weight_bytes_per_token(model)
    reference = None
    if args.skip_torch:
        reference = TorchEngine(model).run(np.random.default_rng(0).integers(1, 4000, (1, PROMPT)), NEW)[0]
    bandwidths: list[float] = []  # measured once per round; the bound uses the best (least loaded) one
    rows = speed_rows(engines, args.rounds, model.config.vocab_size, reference, args.threads, bandwidths)
    bandwidth = max(bandwidths)
    bound = bandwidth * 1e9 / per_token
    for row in rows.values():
        row["best % of fp32 bound"] = 100 * row["best b1"] / bound
    print(f"model: {model_dir}  threads: {args.threads}  rounds: {args.rounds}  stillroom spin: {spin}")
    print(f"read bandwidth per round {[round(b, 1) for b in bandwidths]} GB/s; best {bandwidth:.1f} GB/s")
    print(f"fp32 weights {per_token / 1e6:.0f} MB/token -> fp32 bound {bound:.1f} tok/s")
    print(table("speed (greedy; agree = tokens equal to PyTorch fp32)", rows))
    if "onnxruntime-genai fp32" in rows:
        ratio = rows["stillroom fp32"]["tok/s b1"] / rows["onnxruntime-genai fp32"]["tok/s b1"]
        best = rows["stillroom fp32"]["best b1"] / rows["onnxruntime-genai fp32"]["best b1"]
        print(
            f"\nstillroom fp32 / onnxruntime-genai fp32, batch 1: {ratio:.2f}x median, {best:.2f}x best round"
        )
    if args.model is None:
        teacher_dir = REPO / "stillroom" / "data" / "lm_teacher"
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="float32").eval()
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher_graphs = build_graphs(teacher, work / "teacher_graphs")
        print(table("quality on the embedded teacher (64-token greedy continuations, held-out perplexity)",
                    quality_rows(teacher, tokenizer, teacher_graphs, args.threads)))  # fmt: skip


if __name__ == "__main__":
    main()
