"""Datasets: the embedded defaults and user files.

Text sources are plain ``.txt`` files, ``.jsonl`` files with ``text`` or ``prompt``/``response``
fields, directories holding ``train.*``/``valid.*`` files, or ``embedded:NAME``. Language-model
training uses fixed-length blocks of the concatenated token stream (documents joined by EOS), the
standard causal-LM packing; prompt/response records stay one example each, with the loss on the
response only (the prompt's labels are -100).
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
        raise StillroomError(
            f"data source '{source}' does not exist", "give a .txt/.jsonl file or a directory"
        )
    if path.is_file():
        return [path] if split == "train" else []
    files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and p.stem.startswith(split))
    if split == "train" and not files:
        files = sorted(
            p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and not p.stem.startswith("valid")
        )
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
                raise StillroomError(
                    f"data file '{file}' line {n} is not JSON", "one JSON object per line"
                ) from err
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
    raise StillroomError(
        f"data file '{file}' line {n} has neither 'text' nor 'prompt'",
        'use {"text": ...} or {"prompt": ..., "response": ...}',
    )


def token_stream(tokenizer, records: list[TextRecord], max_tokens: int | None = None) -> torch.Tensor:
    """All records tokenised and joined with EOS, as one 1-D LongTensor.

    With ``max_tokens`` tokenisation stops once that many tokens exist (long documents are then
    tokenised paragraph by paragraph, so a few MB of text is not tokenised to keep a few KB).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for record in records:
        pieces = [record.text] if max_tokens is None else _paragraphs(record.text)
        for piece in pieces:
            ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
            if max_tokens is not None and len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _paragraphs(text: str, size: int = 16384) -> list[str]:
    """``text`` cut after blank lines into pieces of about ``size`` characters (concatenation = text)."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + size)
        stop = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:stop])
        start = stop
    return pieces


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping ``seq_len`` windows of a token stream (the remainder is dropped)."""

    def __init__(self, stream: torch.Tensor, seq_len: int) -> None:
        if stream.numel() < seq_len:
            raise StillroomError(
                f"the data has {stream.numel()} tokens, fewer than one block of {seq_len}",
                "add data or lower data.seq_len",
            )
        n = stream.numel() // seq_len
        self.blocks = stream[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


class PromptResponses(torch.utils.data.Dataset):
    """One example per prompt/response record: ``prompt + response + EOS`` truncated to ``seq_len``.

    Items are dicts with ``input_ids``, ``labels`` (-100 on the prompt) and ``prompt_len``; lengths
    differ, ``pad_examples`` pads them. Records without a prompt are trained on in full.
    """

    def __init__(self, tokenizer, records: list[TextRecord], seq_len: int) -> None:
        eos = tokenizer.eos_token_id
        self.items: list[dict[str, Any]] = []
        for record in records:
            prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else []
            rest_text = record.response if record.prompt is not None else record.text
            rest = tokenizer(rest_text or "", add_special_tokens=False)["input_ids"]
            rest = rest + ([eos] if eos is not None else [])
            prompt = prompt[: seq_len - 1]
            ids = (prompt + rest)[:seq_len]
            if len(ids) < 2:
                continue
            labels = [-100] * len(prompt) + ids[len(prompt) :]
            self.items.append(
                {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "prompt_len": len(prompt)}
            )
        if not self.items:
            raise StillroomError("the prompt/response data holds no usable example", "check the JSONL file")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PackedBlocks(torch.utils.data.Dataset):
    """``TokenBlocks`` as dict items (``input_ids``, ``labels`` = the ids, ``prompt_len`` 0)."""

    def __init__(self, blocks: TokenBlocks) -> None:
        self.blocks = blocks.blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids, "prompt_len": 0}


def lm_examples(tokenizer, records: list[TextRecord], seq_len: int, max_tokens: int | None = None):
    """Training examples: packed blocks for plain text, one example per record for prompt/response."""
    if any(r.prompt is not None for r in records):
        return PromptResponses(tokenizer, records, seq_len)
    stream = token_stream(tokenizer, records, max_tokens)
    return PackedBlocks(TokenBlocks(stream, seq_len))


def pad_examples(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads dict items to the longest: ``input_ids``, ``attention_mask``, ``labels``,
    ``prompt_len`` (and ``index`` when the items carry one)."""
    width = max(int(item["input_ids"].numel()) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = int(item["input_ids"].numel())
        ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention[row, :n] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "prompt_len": torch.tensor([int(item["prompt_len"]) for item in items]),
    }
    if all("index" in item for item in items):
        batch["index"] = torch.tensor([int(item["index"]) for item in items])
    return batch
