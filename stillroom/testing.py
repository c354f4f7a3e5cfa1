"""Tiny teachers, students and datasets built from configs (random weights, no hub download).

For plugin authors' tests as much as for stillroom's own tests, benchmarks and the GPU check: a
method plugin can train on them in seconds on a CPU.

They go through exactly the code paths of real students: a generator student directory as the
diffusion methods save it (``unet/``, ``scheduler/``, ``stillroom.json`` with its sampler, and for
text conditioning ``text_encoder/`` + ``tokenizer/``), and GPT-2 / Llama (GQA, RoPE, tied embeddings)
transformers directories with a byte-level BPE tokenizer trained on the embedded held-out text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
) * 8


def build_tokenizer(out: Path, vocab_size: int = 300, max_length: int | None = None, text: str | None = None):
    """A byte-level BPE trained on ``text`` (default: a Hamlet line + the embedded held-out plays)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    if text is None:
        from stillroom.data import heldout_text

        text = TEXT + heldout_text()[:20000]
    tok.train_from_iterator([text], trainer)
    kwargs = {"model_max_length": max_length} if max_length else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        **kwargs,
    )
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, tokenizer, layers: int = 2, hidden: int = 32, seed: int = 0, heads: int = 4):
    """A Llama (GQA with heads/2 KV heads, RoPE, tied embeddings) for ``tokenizer``, saved with it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **_special_ids(tokenizer),
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_lm(out: Path, family: str = "llama", layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny GPT-2 or Llama (4 heads, 2 KV heads, tied embeddings) with its tokenizer in ``out``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    tokenizer = build_tokenizer(out)
    if family == "llama":
        build_tiny_llama(out, tokenizer, layers, hidden, seed)
        return out
    if family != "gpt2":
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        **_special_ids(tokenizer),
    )
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_generator(
    out: Path,
    steps: int = 2,
    conditioning: str | None = "class",
    guidance: float | None = None,
    size: int = 8,
    seed: int = 0,
) -> Path:
    """A generator student directory: a tiny UNet, a DDIM schedule and a ``steps``-step sampler."""
    import diffusers

    from stillroom.plugins.diffusion.sampler import ddim_timesteps

    out = Path(out)
    torch.manual_seed(seed)
    common = {
        "sample_size": size,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
    }
    num_classes = 10 if conditioning == "class" else None
    if conditioning == "text":
        from transformers import CLIPTextConfig, CLIPTextModel

        unet = diffusers.UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
        )
        tokenizer = build_tokenizer(out / "tokenizer", vocab_size=280, max_length=8)
        encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=8,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
            )
        )
        encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    else:
        unet = diffusers.UNet2DModel(
            **common,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=(num_classes + 1) if num_classes else None,
        )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    scheduler.save_pretrained(out / "scheduler")
    sampler = {
        "steps": steps,
        "timesteps": ddim_timesteps(dict(scheduler.config), steps),
        "guidance": guidance,
        "guidance_embed": False,
        "prediction": "epsilon",
        "boundary": None,
        "conditioning": conditioning,
        "num_classes": num_classes,
        "null_class": num_classes,
        "image_size": size,
        "channels": 1,
        "latent": False,
        "hybrid": None,
    }
    (out / "stillroom.json").write_text(
        json.dumps(
            {"format_version": 1, "method": "tiny", "family": "diffusion", "sampler": sampler}, indent=2
        )
    )
    return out


def build_class_teacher(out: Path, size: int = 8, seed: int = 0) -> Path:
    """A 1-channel class-conditional UNet2DModel (10 classes + null class 10) and a DDPM scheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=11,
        attention_head_dim=8,
    )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(out / "scheduler")
    return out


def build_text_teacher(out: Path, seed: int = 0) -> Path:
    """UNet2DConditionModel (4 latent channels, 8x8) + tiny CLIP text encoder/tokenizer + tiny VAE (16px)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).save_pretrained(out / "scheduler")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(out / "vae", safe_serialization=True)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=8)
    tokenizer.save_pretrained(tok_dir)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            eos_token_id=1,
            bos_token_id=0,
            pad_token_id=1,
        )
    )
    encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    return out


def build_caption_folder(out: Path, n: int = 8, size: int = 16) -> Path:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": ["a red cat", "a blue dog"][i % 2]}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out


def build_label_folder(out: Path, n: int = 40, size: int = 8) -> Path:
    """Grey 'digits': class c is a bright bar at row c % size over a dark background, plus noise."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        label = i % 10
        img = rng.integers(0, 40, (size, size), dtype=np.uint8)
        img[label % size] = 230
        Image.fromarray(img).save(out / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "label": label}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out
