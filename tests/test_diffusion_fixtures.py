"""Tiny diffusers teachers built from configs (class- and text-conditional) for the diffusion tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


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


@pytest.fixture(scope="session")
def label_folder(tmp_path_factory) -> Path:
    return build_label_folder(tmp_path_factory.mktemp("labels"))


@pytest.fixture(scope="session")
def class_teacher(tmp_path_factory) -> Path:
    return build_class_teacher(tmp_path_factory.mktemp("class_teacher"))


@pytest.fixture(scope="session")
def text_teacher(tmp_path_factory) -> Path:
    return build_text_teacher(tmp_path_factory.mktemp("text_teacher"))


def diffusion_recipe(method: dict, teacher: Path, data: dict, student: dict | None = None, **train):
    cfg = {
        "steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "seed": 0,
        "device": "cpu",
        "tensorboard": False,
        "precision": "fp32",
        "clip_grad": 1.0,
    }
    cfg.update(train)
    return {
        "method": method,
        "teacher": {"path": str(teacher), "guidance": 2.0},
        "student": student or {"steps": 1},
        "data": data,
        "train": cfg,
    }


def test_fixture_teachers_load(class_teacher, text_teacher):  # noqa: F811
    from stillroom.core.diffusion_models import load_teacher

    c = load_teacher(str(class_teacher))
    assert c.conditioning == "class" and c.null_class == 10 and c.image_size == 8
    t = load_teacher(str(text_teacher))
    assert t.conditioning == "text" and t.vae is not None and t.tokenizer("a cat").input_ids[0] == 0
