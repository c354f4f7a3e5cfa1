"""Graph edits that make an exported KV-cache LM cheap to decode, without changing what it computes.

1. **Last-position logits on demand.** The validated export computes logits for every position (so
   perplexity can be measured on the shipped graph). A runtime only needs the last one, in prefill
   and in decode; for a 128-token prompt and a 49k vocabulary the vocabulary projection of the other
   127 positions is most of the prefill. We insert a graph input ``logits_to_keep`` (int64 [1]) that
   is also an initializer holding 0, so it is *optional*: callers that do not feed it (validation,
   older runtimes) get all positions as before, a fast runtime feeds 1. The hidden states ``h`` that
   enter the vocabulary projection are sliced first::

       logits = h[:, S - k :, :] @ W_vocab        (k = 0 means all S positions)

2. **Untied vocabulary projection.** With tied embeddings the exporter writes ``Transpose(E)`` feeding
   the last MatMul. ORT would fold that at load time anyway; writing ``E^T`` as its own initializer
   lets weight-only quantisers (MatMulNBits) see a constant right-hand side and quantise it, while
   the embedding Gather keeps exact rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stillroom.core.errors import StillroomError

log = logging.getLogger(__name__)

LOGITS_TO_KEEP = "logits_to_keep"


def _producer(graph, name: str):
    return next((n for n in graph.node if name in n.output), None)


def vocab_matmul(graph):
    """The MatMul node that writes the ``logits`` output (the vocabulary projection)."""
    node = _producer(graph, "logits")
    if node is None or node.op_type != "MatMul":
        raise StillroomError(
            "cannot find the vocabulary projection (a MatMul writing 'logits') in the LM graph",
            "export with stillroom's KV-cache exporter, or serve without the fast graph edits",
        )
    return node


def untie_vocab_projection(model) -> bool:
    """Replaces ``Transpose(initializer)`` feeding the vocabulary MatMul by a transposed initializer."""
    from onnx import numpy_helper

    graph = model.graph
    matmul = vocab_matmul(graph)
    inits = {i.name: i for i in graph.initializer}
    if matmul.input[1] in inits:
        return False
    transpose = _producer(graph, matmul.input[1])
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
        return False
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    weight = numpy_helper.to_array(inits[transpose.input[0]], base_dir="")
    if weight.ndim != 2 or perm not in (None, [1, 0]):
        return False
    name = transpose.input[0] + ".T"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
    matmul.input[1] = name
    if not any(transpose.output[0] in n.input for n in graph.node if n is not matmul):
        graph.node.remove(transpose)
    return True


def add_logits_to_keep(model) -> None:
    """Inserts the optional ``logits_to_keep`` input (default 0 = all) and the slice it controls."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return
    matmul = vocab_matmul(graph)
    hidden = matmul.input[0]
    sliced = hidden + ".last"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_TO_KEEP),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "logits_to_keep.end"),
            numpy_helper.from_array(np.array([1], np.int64), "logits_to_keep.axis"),
        ]
    )
    index = list(graph.node).index(matmul)
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], ["logits_to_keep.start"], name="logits_to_keep/neg"),
        helper.make_node(
            "Slice",
            [hidden, "logits_to_keep.start", "logits_to_keep.end", "logits_to_keep.axis"],
            [sliced],
            name="logits_to_keep/slice",
        ),
    ]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    matmul.input[0] = sliced
    logits = next(o for o in graph.output if o.name == "logits")
    dims = logits.type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].Clear()
        dims[1].dim_param = "logits_length"


def fast_edits(model) -> dict:
    """Both edits in place; returns what was done (for the manifest)."""
    untied = untie_vocab_projection(model)
    add_logits_to_keep(model)
    return {"logits_to_keep_input": True, "untied_vocab_projection": untied}


def edit_file(src: Path, dst: Path) -> dict:
    """``fast_edits`` on the graph at ``src``, written to ``dst`` (may be the same path)."""
    import onnx

    from stillroom.core.onnx_variants import save_model

    model = onnx.load(str(src))
    done = fast_edits(model)
    save_model(model, Path(dst))
    return done
