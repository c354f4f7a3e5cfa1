"""The onnxruntime and torch runtimes: greedy identity with transformers, left padding, sampling, providers.

``build_lm_artifact`` is shared with the server and bench tests: it uses the exporter when it exists
and otherwise a minimal TorchScript export of the same graph contract (Optimum names, explicit KV).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stillroom.core.errors import StillroomError
from stillroom.testing import build_tiny_llama, build_tokenizer
from tests.conftest import CORPUS

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _fallback_export(model_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from stillroom.core.artifact import Manifest, TensorSpec, write_manifest

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = model.config
    layers, kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    class KVWrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    b, s, p = 2, 3, 4
    args = (
        torch.randint(0, cfg.vocab_size, (b, s)),
        torch.ones(b, p + s, dtype=torch.long),
        torch.arange(p, p + s)[None].expand(b, s),
        *[torch.randn(b, kv, p, head_dim) for _ in past_names],
    )
    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    dyn.update({n: {0: "batch", 2: "past"} for n in past_names})
    dyn.update({n: {0: "batch", 2: "total"} for n in present_names})
    out.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            KVWrapper(model),
            args,
            str(out / "model.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dyn,
        )
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out / "tokenizer")
    kv_shape = ["batch", kv, "past", head_dim]
    write_manifest(
        out,
        Manifest(
            kind="causal-lm",
            exporter="torchscript",
            graphs={"model": "model.onnx"},
            tokenizer="tokenizer",
            inputs=[
                TensorSpec(name="input_ids", dtype="int64", shape=["batch", "seq"]),
                TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "total"]),
                TensorSpec(name="position_ids", dtype="int64", shape=["batch", "seq"]),
                *[TensorSpec(name=n, dtype="float32", shape=kv_shape) for n in past_names],
            ],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "seq", cfg.vocab_size])],
            source={"model_dir": str(model_dir)},
            validation={"passed": True},
            extra={"num_key_value_heads": kv, "head_dim": head_dim},
        ),
    )


def build_lm_artifact(model_dir: Path, out: Path) -> Path:
    """A causal-LM artifact of ``model_dir`` (the exporter's when it is there)."""
    try:
        from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm
    except ImportError:
        _fallback_export(model_dir, out)
        return out
    export_causal_lm(model_dir, out)
    return out


_BUILT: dict[str, object] = {}  # other test modules import these fixtures; build each thing once per session


def once(key: str, build):
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


@pytest.fixture(scope="session")
def lm_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher dir, student dir) sharing a tokenizer: a 2-layer teacher and a 1-layer student."""
    return once("lm_pair", lambda: _build_pair(tmp_path_factory.mktemp("serve_lm")))


def _build_pair(root: Path) -> tuple[Path, Path]:
    tok = build_tokenizer(root / "teacher", vocab_size=320, text=CORPUS * 5)
    build_tiny_llama(root / "teacher", tok, layers=2, hidden=32, seed=0)
    tok.chat_template = CHAT_TEMPLATE  # the student's tokenizer (and so its artifact) can chat
    build_tiny_llama(root / "student", tok, layers=1, hidden=32, seed=1)
    return root / "teacher", root / "student"


@pytest.fixture(scope="session")
def lm_artifact(lm_pair, tmp_path_factory) -> Path:
    return once(
        "lm_artifact",
        lambda: build_lm_artifact(lm_pair[1], tmp_path_factory.mktemp("serve_art") / "artifact"),
    )


def _hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            min_new_tokens=n,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_ort_greedy_matches_transformers_with_left_padding(lm_pair, lm_artifact):
    from stillroom.plugins.lm.sampling import SamplingParams
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime

    lm = load_onnxruntime(lm_artifact, provider="cpu")
    prompts = [lm.encode("To be, or not"), lm.encode("The"), lm.encode("Whether 'tis nobler in the mind")]
    params = [SamplingParams(max_tokens=8, ignore_eos=True) for _ in prompts]
    batched = lm.generate(prompts, params).run()
    for row, prompt in enumerate(prompts):
        alone = lm.generate([prompt], params[:1]).run()
        reference = _hf_greedy(lm_pair[1], prompt, 8)
        assert alone.outputs[0] == reference
        assert batched.outputs[row] == reference, f"left-padded row {row} differs"
    assert batched.finish_reasons == ["length"] * 3
    assert batched.ttft_s is not None and batched.total_s >= batched.ttft_s


def test_torch_runtime_matches_ort_and_full_logits(lm_pair, lm_artifact):
    from stillroom.plugins.lm.sampling import SamplingParams
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.runtimes import torch_runtime as load_torch

    ort_lm = load_onnxruntime(lm_artifact, provider="cpu")
    with pytest.raises(StillroomError, match="is an exported artifact; the torch runtime runs a PyTorch"):
        load_torch(lm_artifact)  # an artifact holds graphs; its source folder is not read behind its back
    torch_lm = load_torch(str(lm_pair[1]))
    assert torch_lm.runtime == "torch" and torch_lm.info["model"] == str(lm_pair[1])
    prompts = [torch_lm.encode("To die, to sleep"), torch_lm.encode("No")]
    params = [SamplingParams(max_tokens=6, ignore_eos=True)] * 2
    assert torch_lm.generate(prompts, params).run().outputs == ort_lm.generate(prompts, params).run().outputs
    ids = np.array([prompts[0][:4]])
    np.testing.assert_allclose(ort_lm.full_logits(ids), torch_lm.full_logits(ids), atol=1e-4)


def test_stop_tokens_and_seeded_sampling(lm_artifact):
    from stillroom.plugins.lm.sampling import SamplingParams
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime

    lm = load_onnxruntime(lm_artifact, provider="cpu")
    prompt = lm.encode("To be")
    greedy = lm.generate([prompt], [SamplingParams(max_tokens=12, ignore_eos=True)]).run().outputs[0]
    k = max(i for i in range(len(greedy)) if greedy[i] not in greedy[:i])  # the last first-occurrence
    stop = SamplingParams(max_tokens=12, stop_token_ids=frozenset([greedy[k]]))
    gen = lm.generate([prompt], [stop]).run()
    assert gen.outputs[0] == greedy[:k] and gen.finish_reasons == ["stop"]
    hot = [
        SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 1, 2)
    ]
    runs = [lm.generate([prompt], [p]).run().outputs[0] for p in hot]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_nucleus_probs_against_float64_reference():
    from stillroom.plugins.lm.sampling import nucleus_probs

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50) * 3
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (2.0, 0.5), (1.0, 1e-6)]:
        z = [float(v) / temperature for v in logits]
        m = max(z)
        e = [np.exp(np.float64(v - m)) for v in z]
        total = sum(e)
        probs = [v / total for v in e]
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept, acc = [], 0.0
        for i in order:  # smallest set whose mass reaches top_p (Holtzman et al. 2020)
            kept.append(i)
            acc += probs[i]
            if acc >= top_p:
                break
        ref = np.zeros(len(probs))
        for i in kept:
            ref[i] = probs[i] / acc
        np.testing.assert_allclose(nucleus_probs(logits, temperature, top_p), ref, rtol=1e-12, atol=1e-15)


def test_requested_provider_must_be_available_unless_fallback(lm_artifact):
    import onnxruntime as ort

    from stillroom.core.ort_session import provider_chain
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime

    available = ["CPUExecutionProvider"]
    assert provider_chain("auto", available) == ["cpu"]
    assert provider_chain("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["cuda", "cpu"]
    with pytest.raises(StillroomError, match="not available"):
        provider_chain("cuda", available)
    assert provider_chain("cuda", available, allow_fallback=True) == ["cpu"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(StillroomError, match="cuda"):
            load_onnxruntime(lm_artifact, provider="cuda")
        lm = load_onnxruntime(lm_artifact, provider="cuda", allow_fallback=True)
        assert lm.provider == "cpu"


def test_tampered_artifact_is_refused(lm_artifact, tmp_path):
    import shutil

    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime

    copy = tmp_path / "copy"
    shutil.copytree(lm_artifact, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(StillroomError, match="sha256"):
        load_onnxruntime(copy)


@pytest.mark.gpu
def test_ort_cuda_iobinding_matches_cpu(lm_artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider")
    from stillroom.plugins.lm.sampling import SamplingParams
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime

    cpu = load_onnxruntime(lm_artifact, provider="cpu")
    gpu = load_onnxruntime(lm_artifact, provider="cuda")
    assert gpu.provider == "cuda" and gpu.backend.device == "cuda"
    prompts = [cpu.encode("To be, or not"), cpu.encode("The")]
    params = [SamplingParams(max_tokens=8, ignore_eos=True)] * 2
    assert gpu.generate(prompts, params).run().outputs == cpu.generate(prompts, params).run().outputs
