"""Tiny students built from configs (random weights, no hub): for export tests and the export report.

They go through exactly the code paths of real students: a generator student directory as the
diffusion methods save it (``unet/``, ``scheduler/``, ``stillroom.json`` with its sampler, and for
text conditioning ``text_encoder/`` + ``tokenizer/``), and GPT-2 / Llama (GQA, RoPE, tied embeddings)
transformers directories with a byte-level BPE tokenizer trained on the embedded held-out text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
) * 8


def build_tokenizer(out: Path, vocab_size: int = 300, max_length: int | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stillroom.export.lm_validation import heldout_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT + heldout_text()[:20000]], trainer)
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


def build_tiny_lm(out: Path, family: str = "llama", layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny GPT-2 or Llama (4 heads, 2 KV heads, tied embeddings) with its tokenizer in ``out``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer(out)
    torch.manual_seed(seed)
    ids = {
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **ids
        )
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **ids,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown family {family!r}")
    model.save_pretrained(out, safe_serialization=True)
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

    from stillroom.core.generator import ddim_timesteps

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
