"""The embedded LM defaults (Shakespeare corpus, BPE tokenizer, Llama teacher) load offline and work.

They are built by benchmarks/train_lm_teacher.py; these checks catch a broken or stale rebuild: a
tokenizer that no longer round-trips, a teacher that no longer loads, or one that has not learned the
corpus (its held-out perplexity is compared with the measured value and with a random-init model).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "stillroom" / "data"
CORPUS = DATA / "shakespeare"
TEACHER = DATA / "lm_teacher"
EOT = "<|endoftext|>"
SEQ_LEN = 128
HEAD_TOKENS = 2048
# stillroom/data/lm_teacher/TRAINING.md measured 120.47 on the first 2048 tokens of valid.txt (101.90
# on all of it); 1.2x margin. A random-init model of the same config scores about the vocab size, 4096.
MAX_HEAD_PERPLEXITY = 145.0
SHAKESPEARE = "Now is the winter of our discontent\nMade glorious summer by this sun of York;"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEACHER, local_files_only=True)


@pytest.fixture(scope="module")
def head_ids(tokenizer) -> torch.Tensor:
    text = (CORPUS / "valid.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:40_000], verbose=False)["input_ids"][:HEAD_TOKENS]
    assert len(ids) == HEAD_TOKENS
    return torch.tensor(ids).view(-1, SEQ_LEN)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """Token-level perplexity over non-overlapping windows, as in benchmarks/train_lm_teacher.py."""
    model.eval()
    logits = model(input_ids=windows).logits[:, :-1].float()
    targets = windows[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    return math.exp(nll.item())


def test_corpus_is_split_by_whole_plays():
    train = (CORPUS / "train.txt").read_text(encoding="utf-8")
    valid = (CORPUS / "valid.txt").read_text(encoding="utf-8")
    assert "Friends, Romans, countrymen" in valid and "Friends, Romans, countrymen" not in train
    assert "To be, or not to be" in train
    assert valid.count(EOT) == 1
    assert 0.03 < len(valid) / (len(train) + len(valid)) < 0.08
    assert sum(p.stat().st_size for p in CORPUS.iterdir()) <= 4.2 * 1024 * 1024


def test_tokenizer_round_trips_shakespeare(tokenizer):
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOT
    ids = tokenizer(SHAKESPEARE)["input_ids"]
    assert len(ids) < len(SHAKESPEARE) / 2.5  # real merges, not bytes
    assert tokenizer.decode(ids) == SHAKESPEARE
    assert tokenizer(f"Exeunt.\n{EOT}")["input_ids"][-1] == tokenizer.eos_token_id


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Who's there?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nWho's there?\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == prompt


def test_teacher_has_learned_the_corpus(head_ids):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, local_files_only=True)
    assert isinstance(teacher, LlamaForCausalLM)
    assert 3_000_000 < sum(p.numel() for p in teacher.parameters()) < 5_000_000
    trained = perplexity(teacher, head_ids)

    torch.manual_seed(0)
    untrained = perplexity(LlamaForCausalLM(teacher.config), head_ids)
    assert trained < MAX_HEAD_PERPLEXITY, trained
    assert untrained > 10 * MAX_HEAD_PERPLEXITY, untrained


def test_teacher_fits_the_package_budget():
    assert sum(p.stat().st_size for p in TEACHER.iterdir() if p.is_file()) <= 20 * 1024 * 1024
