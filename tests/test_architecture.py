"""The layering of docs/architecture.md, checked on the source: who may import whom, no circles.

Every ``import stillroom...`` / ``from stillroom... import`` statement counts, also the ones inside
functions (a lazy import is still a dependency). The rules:

- ``core`` imports only ``core`` and ``data`` (and names no family);
- a family (``plugins/NAME``) imports only ``core``, ``data`` and itself: never another family,
  ``export``, ``serve`` or the CLI;
- ``export`` imports ``core`` and ``data``: it reaches families through the host (``Family``);
- ``serve`` imports ``core``, ``data`` and a family's inference modules (runtime, engine, sampling,
  decode loop), never training code (methods, trainer, data pipelines) nor ``export``;
- nothing imports the top (``cli``, ``demo``, ``pipeline``, ``testing``) except the top.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "stillroom"
TOP = {
    "stillroom",
    "stillroom.cli",
    "stillroom.demo",
    "stillroom.testing",
    "stillroom.__main__",
    "stillroom.pipeline",
}
SERVE_MAY_USE = {"runtime", "engine", "sampling", "decode_loop"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every stillroom module ``path`` imports (``from pkg import mod`` counts ``pkg.mod`` if it exists)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stillroom"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stillroom"):
            for alias in node.names:
                if alias.name.startswith("__"):  # ``from stillroom import __version__``: metadata, not code
                    continue
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer(name: str) -> str:
    parts = name.split(".")
    if name in TOP or len(parts) < 2:
        return "top"
    if parts[1] == "plugins" and len(parts) > 2:
        return f"plugins.{parts[2]}"
    return parts[1]


def allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if a == "top" or a == b or b in ("core", "data"):
        return True
    if b == "plugins":  # the plugins package itself (empty)
        return True
    if a == "serve" and b.startswith("plugins."):
        return dst.split(".")[-1] in SERVE_MAY_USE
    return False


def test_every_import_follows_the_layering():
    bad = sorted(f"{src} -> {dst}" for src, dsts in GRAPH.items() for dst in dsts if not allowed(src, dst))
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_circle():
    """Tarjan's strongly connected components over the module graph; any component > 1 is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


FAMILY_WORDS = re.compile(
    "|".join(
        [
            r"diffusion|causal|\blms?\b|unet|llama|mnist|shakespeare|stillroom\.plugins",
            r"(?<!torch\.)\b[Gg]enerators?\b(?!=)",  # not torch.Generator / generator=
        ]
    ),
    re.I,
)


@pytest.mark.parametrize("path", sorted(ROOT.joinpath("core").glob("*.py")), ids=lambda p: p.name)
def test_core_names_no_family(path):
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FAMILY_WORDS.search(line)
    ]
    assert not hits, "core/ is family-neutral:\n" + "\n".join(hits)


def test_one_place_steps_an_ort_kv_cache_graph():
    """Only the LM engine feeds ``present`` back as ``past_key_values`` through an ORT session."""
    runs = re.compile(r"run_with_ort_values|run_with_iobinding|\.run\(")
    steppers = sorted(
        name
        for name, path in MODULES.items()
        if "past_key_values" in (text := path.read_text(encoding="utf-8")) and runs.search(text)
    )
    assert steppers == ["stillroom.plugins.lm.engine"], steppers


def test_the_checker_sees_lazy_imports():
    """The rules above would be empty promises if imports inside functions were missed."""
    lazy = defaultdict(set)
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("stillroom"):
                        lazy[name].add(inner.module)
    assert lazy, "no function-level stillroom import found: the walk is broken"
    for name, mods in lazy.items():
        assert all(m in GRAPH[name] or any(g.startswith(m) for g in GRAPH[name]) for m in mods)
