"""``stillroom eval RUN_OR_MODEL_DIR``: held-out perplexity, top-1 agreement with the teacher, samples.

A run directory (``recipe.yaml`` + ``student/``) supplies its own teacher, data and block length; a
plain model directory (any transformers causal LM) needs ``--teacher`` for agreement and uses the
embedded corpus unless ``--data`` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from stillroom.core.errors import StillroomError


def resolve_target(
    target: Path, teacher: str | None, data: str | None, seq_len: int | None
) -> tuple[Path, str | None, str, int]:
    """(model dir, teacher spec, data source, seq_len) for a run or a model directory."""
    recipe: dict[str, Any] = {}
    model_dir = target
    if (target / "recipe.yaml").is_file() and (target / "student").is_dir():
        import yaml

        recipe = yaml.safe_load((target / "recipe.yaml").read_text()) or {}
        model_dir = target / "student"
    elif (target / "stillroom.json").is_file():
        recipe = json.loads((target / "stillroom.json").read_text()).get("recipe", {})
    if not (model_dir / "config.json").is_file():
        raise StillroomError(
            f"'{target}' is neither a run directory nor a model directory",
            "give RUN (with student/) or a directory holding config.json",
        )
    teacher = teacher or (recipe.get("teacher") or {}).get("path")
    data_cfg = recipe.get("data") or {}
    return (
        model_dir,
        teacher,
        data or data_cfg.get("source", "embedded:shakespeare"),
        seq_len or int(data_cfg.get("seq_len", 128)),
    )


def evaluate_dir(
    target: Path,
    teacher: str | None = None,
    data: str | None = None,
    seq_len: int | None = None,
    tokens: int = 8192,
    samples: int = 2,
    max_new_tokens: int = 48,
    device: str = "auto",
) -> dict:
    """The evaluation as a dict: perplexity, top1_agreement (with a teacher), samples."""
    import torch

    from stillroom.core.trainer import resolve_device
    from stillroom.plugins.lm import data as textdata
    from stillroom.plugins.lm import models
    from stillroom.plugins.lm.base import check_same_vocab_size, check_same_vocabulary
    from stillroom.plugins.lm.generate import sample
    from stillroom.plugins.lm.metrics import evaluate_lm

    model_dir, teacher_spec, source, seq_len = resolve_target(Path(target), teacher, data, seq_len)
    dev = resolve_device(device)
    model, tokenizer = models.load_causal_lm(str(model_dir), "student")
    model.to(dev).eval()
    teacher_model = None
    if teacher_spec:
        teacher_model, teacher_tok = models.load_causal_lm(teacher_spec, "teacher")
        check_same_vocabulary(teacher_tok, tokenizer, teacher_spec, str(model_dir))
        check_same_vocab_size(teacher_model, model, teacher_spec, str(model_dir))
        teacher_model.to(dev).eval()
    files = textdata.split_files(source, "valid")
    records = textdata.read_records(files or textdata.split_files(source, "train"))
    stream = textdata.token_stream(tokenizer, records)
    stream = stream[:tokens] if files else stream[-tokens:]
    blocks = textdata.TokenBlocks(stream, seq_len).blocks.to(dev)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "teacher": teacher_spec,
        "data": source,
        "tokens": int(blocks.numel()),
    }
    result.update(evaluate_lm(model, blocks, 8, teacher=teacher_model))
    gen = torch.Generator(device=dev).manual_seed(0)
    result["samples"] = []
    for row in range(min(samples, blocks.shape[0])):
        prompt = blocks[row : row + 1, :16]
        ids, _ = sample(model, prompt, max_new_tokens, 0.8, tokenizer.eos_token_id, generator=gen)
        result["samples"].append(
            {
                "prompt": tokenizer.decode(prompt[0]),
                "continuation": tokenizer.decode(ids[0, prompt.shape[1] :], skip_special_tokens=True),
            }
        )
    return result


@click.command("eval")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--teacher", default=None, help="Teacher for agreement (default: the run's teacher).")
@click.option("--data", default=None, help="Held-out text: file, directory or embedded:NAME.")
@click.option("--seq-len", type=int, default=None, help="Block length (default: the run's).")
@click.option("--tokens", type=int, default=8192, show_default=True, help="Held-out tokens.")
@click.option("--samples", type=int, default=2, show_default=True, help="Generated samples to show.")
@click.option(
    "--device", default="auto", show_default=True, help="torch device: auto, cpu, cuda, cuda:N or mps."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_command(
    target: Path,
    teacher: str | None,
    data: str | None,
    seq_len: int | None,
    tokens: int,
    samples: int,
    device: str,
    as_json: bool,
) -> None:
    """Held-out perplexity, top-1 agreement with the teacher and samples of an LM run or model dir."""
    result = evaluate_dir(target, teacher, data, seq_len, tokens, samples, device=device)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("metric", "value")
    table.add_row("model", result["model"])
    table.add_row("held-out tokens", str(result["tokens"]))
    table.add_row("perplexity", f"{result['perplexity']:.3f}")
    if "top1_agreement" in result:
        table.add_row(f"top-1 agreement with {result['teacher']}", f"{result['top1_agreement']:.4f}")
    console = Console()
    console.print(table)
    for item in result["samples"]:
        console.print(Text.assemble((item["prompt"], "bold"), item["continuation"]), highlight=False)
