"""benchmarks/gpu_check.py: the clean no-CUDA exit and its non-GPU parts (table, JSON, wheel list)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import tomllib

from tests.conftest import REPO, cli_env

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_exits_at_once_with_one_line_without_cuda(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert out.returncode == 0
    assert out.stdout.count("\n") == 1 and "no CUDA GPU visible" in out.stdout
    assert not list(tmp_path.iterdir())


def test_table_and_json_report_every_row(tmp_path):
    rows = [
        gpu_check.Check("lm/kd: 20 bf16 steps + resume", "ok", 3.25, {"head": 5.0}),
        gpu_check.Check("TensorRT engine", "skip: tensorrt is not installed", 0.01),
        gpu_check.Check("export tiny LM", "FAIL: RuntimeError: boom", 1.0),
    ]
    table = gpu_check.render_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "seconds"] and set(lines[1]) <= {"-", " "}
    assert "3.2" in lines[2] and "FAIL: RuntimeError: boom" in lines[4]
    assert lines[-1] == "2/3 checks without failure"
    data = json.loads(gpu_check.write_results(rows, tmp_path).read_text())
    assert data["passed"] is False and [c["check"] for c in data["checks"]] == [r.check for r in rows]


def test_timed_turns_exceptions_into_fail_rows():
    rows = []
    gpu_check.timed("ok one", rows, lambda: {"x": 1})
    gpu_check.timed("broken", rows, lambda: 1 / 0)
    gpu_check.timed("skipped", rows, lambda: "skip: no tensorrt")
    assert [r.result for r in rows] == [
        "ok",
        "FAIL: ZeroDivisionError: division by zero",
        "skip: no tensorrt",
    ]
    assert [r.ok for r in rows] == [True, False, True]


def test_wheel_list_covers_every_dependency_the_device_lacks():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    missing = names - gpu_check.DEVICE_HAS
    carried = {w.split("==")[0] for w in gpu_check.wheel_requirements()}
    assert missing <= carried, f"not carried to the device: {missing - carried}"
    assert {"pydantic", "pydantic-core", "diffusers"} <= carried


def test_every_builtin_method_has_a_cpu_sized_shipped_recipe():
    from stillroom.core.host import get_host

    for info in get_host().infos():
        if info.builtin:
            for method in info.methods:
                assert gpu_check.shipped_recipe(method)["method"]["name"] == method
