"""The Python-backend model behind a Triton repository's ``NAME_generate``: stillroom's runtime
with Triton tensors in and out.

``stillroom export --to triton`` writes ``REPO/NAME_generate/1/model.py`` as one line that imports
``TritonPythonModel`` from here, beside ``1/artifact/`` (the complete ONNX artifact). Triton's Python
backend imports that file, so stillroom must be importable in the backend's Python environment:
``pip install stillroom`` in the Triton image, or pack an environment holding it and name it in the
model's ``EXECUTION_ENV_PATH`` parameter. What this path imports there: numpy, onnxruntime, pydantic,
pluggy and transformers (tokenizers only; torch is neither needed nor imported).

The artifact is opened with stillroom's own onnxruntime loader and driven exactly as ``stillroom
serve`` drives it, so Triton's outputs are stillroom's by construction: ``LanguageModel.generate``
(the one decode loop) for LMs, ``ImageGenerator.noise`` and ``generate`` for generators.

Tensors (``max_batch_size: 0``, so shapes are whole; the names are ``stillroom.export.triton``'s):

- LMs: ``text`` BYTES [N] prompts; optional ``max_tokens`` INT32 [1] (default 16), ``temperature``
  FP32 [1] (default 0: greedy), ``seed`` INT64 [1] (row i samples with seed + i)
  -> ``text`` BYTES [N], each prompt's completion;
- generators: ``class_labels`` INT64 [N] (class-conditional), ``prompt`` BYTES [N] (text-conditional)
  or ``num_images`` INT32 [1] (unconditional); optional ``seed`` INT64 [1] (the noise of
  ``ImageGenerator.noise(N, seed)``) and ``steps`` INT32 [1], which must be the K the graph unrolls
  -> ``images`` UINT8 [N, H, W, C].

A request stillroom refuses (a wrong ``steps``, a label out of range) gets its one-line message back as
the request's Triton error; the other requests of the batch are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from stillroom.core.host import get_host
from stillroom.serve.pixels import to_pixels

RUNTIMES = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}  # artifact format -> the runtime that runs it
DEFAULT_MAX_TOKENS = 16
Read = Callable[[str], "np.ndarray | None"]  # an input tensor of the request by name; None if not sent


class TritonPythonModel:
    """What Triton's Python backend calls: ``initialize`` once per instance, ``execute`` per batch."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # exists only inside the backend's stub process

        self.pb = pb_utils
        target = str(Path(args["model_repository"]) / args["model_version"] / "artifact")
        runtime = RUNTIMES[artifact.read_manifest(Path(target)).format]
        self.model = get_host().family_for_target(target).load(runtime, target)
        self.handle = HANDLERS[self.model.kind]

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        pb = self.pb

        def read(name: str) -> np.ndarray | None:
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            outputs = self.handle(self.model, read)
        except (StillroomError, ValueError) as err:
            error = pb.TritonError(str(err), pb.TritonError.INVALID_ARG)  # HTTP 400, not 500
            return pb.InferenceResponse(output_tensors=[], error=error)
        tensors = [pb.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
        return pb.InferenceResponse(output_tensors=tensors)


def _scalar(value: np.ndarray | None, default: Any) -> Any:
    return default if value is None else value.reshape(-1)[0].item()


def _strings(value: np.ndarray) -> list[str]:
    """A BYTES tensor (a numpy object array of bytes) as text."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]


def generate_text(model: Any, read: Read) -> dict[str, np.ndarray]:
    """Each prompt's completion through the LM's decode loop; stops at EOS or ``max_tokens``."""
    from stillroom.plugins.lm.sampling import SamplingParams

    prompts = [model.encode(text) for text in _strings(read("text"))]
    max_tokens = int(_scalar(read("max_tokens"), DEFAULT_MAX_TOKENS))
    context = model.info.get("context_length")
    if context and max(len(p) for p in prompts) + max_tokens > context:
        raise StillroomError(
            f"prompt + max_tokens ({max(len(p) for p in prompts)} + {max_tokens}) exceeds the model's "
            f"context of {context} tokens",
            "send a shorter prompt or fewer max_tokens",
        )
    seed, temperature = _scalar(read("seed"), None), float(_scalar(read("temperature"), 0.0))
    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            stop_token_ids=model.eos_ids,
            seed=None if seed is None else (int(seed) + row) % 2**63,
        )
        for row in range(len(prompts))
    ]
    generation = model.generate(prompts, params).run()
    texts = [model.decode(ids).encode("utf-8") for ids in generation.outputs]
    return {"text": np.array(texts, dtype=np.object_)}


def _conditioning(model: Any, read: Read) -> tuple[int, dict[str, np.ndarray]]:
    """(number of images, the conditioning keyword of ``ImageGenerator.generate``) of a request."""
    if model.conditioning == "class":
        labels = read("class_labels").reshape(-1).astype(np.int64)
        if model.num_classes and ((labels < 0) | (labels >= model.num_classes)).any():
            raise StillroomError(
                f"class_labels must lie in [0, {model.num_classes}); got {labels.tolist()}",
                "send one label per image",
            )
        return len(labels), {"class_labels": labels}
    if model.conditioning == "text":
        prompts = _strings(read("prompt"))
        return len(prompts), {"encoder_hidden_states": model.encode(prompts)}
    return int(_scalar(read("num_images"), 1)), {}


def generate_images(model: Any, read: Read) -> dict[str, np.ndarray]:
    """The generator's images for the request's conditioning and seed, as uint8 [N, H, W, C]."""
    steps, unrolled = _scalar(read("steps"), None), int(model.sampler["steps"])
    if steps is not None and int(steps) != unrolled:
        raise StillroomError(
            f"this model's graph unrolls {unrolled} sampling steps; got steps={steps}",
            f"send steps={unrolled} (or none), or re-export with `stillroom export --steps {steps}`",
        )
    count, condition = _conditioning(model, read)
    if count < 1:
        raise StillroomError("the request asks for no images", "send at least one label, prompt or image")
    images = model.generate(model.noise(count, _scalar(read("seed"), None)), **condition)
    return {"images": to_pixels(images)}


HANDLERS = {"causal-lm": generate_text, "generator": generate_images}
