"""Datasets: the embedded defaults and user files.

Text sources are plain ``.txt`` files, ``.jsonl`` files with ``text`` or ``prompt``/``response``
fields, directories holding ``train.*``/``valid.*`` files, or ``embedded:NAME``. Language-model
training uses fixed-length blocks of the concatenated token stream (documents joined by EOS), the
standard causal-LM packing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stillroom.core.errors import StillroomError
from stillroom.data import resolve

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class TextRecord:
    """A document; ``prompt`` is set when the source separates prompt and response."""

    text: str
    prompt: str | None = None
    response: str | None = None


def split_files(source: str, split: str) -> list[Path]:
    """Files of ``split`` ("train" or "valid") for a file, a directory or an embedded name."""
    path = Path(resolve(source)).expanduser()
    if not path.exists():
        raise StillroomError(f"data source '{source}' does not exist", "give a .txt/.jsonl file or a directory")
    if path.is_file():
        return [path] if split == "train" else []
    files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and p.stem.startswith(split))
    if split == "train" and not files:
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and not p.stem.startswith("valid"))
    if split == "train" and not files:
        raise StillroomError(f"data directory '{source}' has no .txt or .jsonl files", "add train.txt")
    return files


def read_records(files: list[Path]) -> list[TextRecord]:
    records: list[TextRecord] = []
    for file in files:
        try:
            raw = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise StillroomError(f"data file '{file}' is not UTF-8 text", "convert it to UTF-8") from err
        if file.suffix == ".txt":
            records.append(TextRecord(raw))
            continue
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise StillroomError(f"data file '{file}' line {n} is not JSON", "one JSON object per line") from err
            records.append(_record(obj, file, n))
    return records


def _record(obj: Any, file: Path, n: int) -> TextRecord:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return TextRecord(obj["text"])
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        response = obj.get("response", "")
        if not isinstance(response, str):
            raise StillroomError(f"data file '{file}' line {n}: 'response' must be text", "fix the line")
        return TextRecord(obj["prompt"] + response, prompt=obj["prompt"], response=response)
    raise StillroomError(f"data file '{file}' line {n} has neither 'text' nor 'prompt'",
                         "use {\"text\": ...} or {\"prompt\": ..., \"response\": ...}")


def token_stream(tokenizer, records: list[TextRecord]) -> torch.Tensor:
    """All records tokenised and joined with EOS, as one 1-D LongTensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for record in records:
        ids.extend(tokenizer(record.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping ``seq_len`` windows of a token stream (the remainder is dropped)."""

    def __init__(self, stream: torch.Tensor, seq_len: int) -> None:
        if stream.numel() < seq_len:
            raise StillroomError(f"the data has {stream.numel()} tokens, fewer than one block of {seq_len}",
                                 "add data or lower data.seq_len")
        n = stream.numel() // seq_len
        self.blocks = stream[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]
