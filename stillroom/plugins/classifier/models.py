"""The family's networks: small VGG-style CNNs built from a config, saved as plain directories.

A classifier directory is ``config.json`` (``ClassifierConfig``) + ``model.safetensors`` (+ the
``stillroom.json`` card the trainer writes beside a student). The shipped teacher
``embedded:mnist_classifier`` (``MnistClassifier``: two stages of two 3x3 convs, 32 and 64 channels,
a 128-d embedding) is the same network at its default config, so teacher and students load, run and
export through the same code.

Stage s is ``convs_per_stage`` x (3x3 conv + ReLU) with ``channels[s]`` outputs, then a 2x2 max-pool;
then the embedding ``features = ReLU(fc(flatten))`` (fc alone under a cosine head) and a head with
``num_classes x subclasses`` outputs (class-major: output ``c * K + j`` is subclass j of class c).
``forward`` returns class logits: with K > 1 the log of the summed subclass probabilities
(``class_logits``).

``MixerClassifier`` is a student of another architecture (HAD): an MLP-Mixer (Tolstikhin et al. 2021)
over non-overlapping ``patch_size`` patches. A ``patch_size`` x ``patch_size`` conv embeds each patch
as a ``feature_dim`` token; ``depth`` blocks each mix across tokens and then across channels

    X <- X + W2 GELU(W1 LN(X)^T)^T  (token mixing, ``token_hidden`` wide)
    X <- X + W4 GELU(W3 LN(X))      (channel mixing, ``channel_hidden`` wide)

and ``features`` is the mean over tokens of LN(X). Either network's head is linear, or with
``head: cosine`` (prototype methods) the scaled cosine ``<z / |z|, w_c / |w_c|> / temperature`` of the
embedding z with each output's weight w_c (its prototype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from torch import nn
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_bytes, write_json
from stillroom.plugins.classifier.spec import ARCHITECTURES, ClassifierSpec, is_classifier_dir

WEIGHTS = "model.safetensors"


class ClassifierConfig(BaseModel):
    """The network's shape and its input convention; defaults are the shipped MNIST teacher's."""

    model_config = ConfigDict(extra="ignore")  # the teacher's config.json also records its training

    architecture: Literal["ConvClassifier", "MnistClassifier", "MixerClassifier"] = "ConvClassifier"
    channels: list[PositiveInt] = Field([32, 64], min_length=1)
    convs_per_stage: PositiveInt = 2
    feature_dim: PositiveInt = 128
    num_classes: PositiveInt = 10
    subclasses: PositiveInt = 1
    in_channels: PositiveInt = 1
    image_size: PositiveInt = 28
    mean: list[float] = [0.5]  # pixels / 255 -> (x - mean) / std: [-1, 1] for the MNIST teacher
    std: list[float] = [0.5]
    class_names: list[str] | None = None
    dropout: float = Field(0.0, ge=0, lt=1)
    head: Literal["linear", "cosine"] = "linear"
    temperature: float = Field(1.0, gt=0)  # the cosine head's logits are cosines / temperature
    patch_size: PositiveInt = 4  # MixerClassifier only, as are the three below
    depth: PositiveInt = 2
    token_hidden: PositiveInt = 64
    channel_hidden: PositiveInt = 128

    def spec(self) -> ClassifierSpec:
        return ClassifierSpec(
            num_classes=self.num_classes,
            class_names=self.class_names or [str(c) for c in range(self.num_classes)],
            subclasses=self.subclasses,
            channels=self.in_channels,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
        )


def class_logits(subclass_logits: torch.Tensor, subclasses: int) -> torch.Tensor:
    """[B, C*K] subclass logits -> [B, C] class logits, log sum_j exp(u_{c,j}).

    softmax of the result is the class probability q(c) = sum_j q(c, j), the sum of the class's
    subclass probabilities; with K = 1 it is the identity.
    """
    if subclasses == 1:
        return subclass_logits
    return subclass_logits.unflatten(-1, (-1, subclasses)).logsumexp(-1)


class CosineHead(nn.Module):
    """Scaled cosine similarity of the embedding with each output's prototype (its weight row)."""

    def __init__(self, features: int, outputs: int, temperature: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, features) / features**0.5)
        self.temperature = temperature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T / self.temperature


class Classifier(nn.Module):
    """What every network of the family shares: an embedding (``features``), a dropout and a head."""

    def add_head(self) -> None:
        """The dropout and the head, created after the body (which keeps a seed's initial weights)."""
        config = self.config
        self.dropout = nn.Dropout(config.dropout)
        outputs = config.num_classes * config.subclasses
        if config.head == "cosine":
            self.head: nn.Module = CosineHead(config.feature_dim, outputs, config.temperature)
        else:
            self.head = nn.Linear(config.feature_dim, outputs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def subclass_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The head's outputs [B, num_classes * subclasses]."""
        return self.head(self.dropout(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return class_logits(self.subclass_logits(images), self.config.subclasses)


class ConvClassifier(Classifier):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        side = config.image_size // 2 ** len(config.channels)
        if side < 1:
            raise StillroomError(
                f"{len(config.channels)} pooling stages leave nothing of a {config.image_size}px image",
                "use fewer entries in student.channels",
            )
        layers: list[nn.Module] = []
        width = config.in_channels
        for out in config.channels:
            for _ in range(config.convs_per_stage):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU()]
                width = out
            layers.append(nn.MaxPool2d(2))
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(width * side * side, config.feature_dim)
        self.add_head()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding [B, feature_dim] of normalised images [B, C, H, W]: ReLU(fc) for a
        linear head; fc alone for a cosine head (its sphere needs signed embeddings, and a ReLU
        embedding that dies to 0 has no direction left to learn from)."""
        z = self.fc(self.conv(images).flatten(1))
        return torch.relu(z) if self.config.head == "linear" else z


def mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, width: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.tokens = nn.LayerNorm(width), mlp(tokens, token_hidden)
        self.norm2, self.channels = nn.LayerNorm(width), mlp(width, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class MixerClassifier(Classifier):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        p, size = config.patch_size, config.image_size
        if size % p:
            raise StillroomError(
                f"patch_size {p} does not divide the {size}px image", "choose a patch_size that divides it"
            )
        self.grid = size // p
        self.embed = nn.Conv2d(config.in_channels, config.feature_dim, p, stride=p)
        self.blocks = nn.Sequential(
            *(
                MixerBlock(self.grid**2, config.feature_dim, config.token_hidden, config.channel_hidden)
                for _ in range(config.depth)
            )
        )
        self.norm = nn.LayerNorm(config.feature_dim)
        self.add_head()

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, N, feature_dim], N = (image_size / patch_size)^2 in row-major order."""
        return self.embed(images).flatten(2).transpose(1, 2)

    def mix(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mixer blocks and the final LayerNorm over tokens [B, N, feature_dim]."""
        return self.norm(self.blocks(tokens))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.mix(self.patch_tokens(images)).mean(1)


NETWORKS = {
    "ConvClassifier": ConvClassifier,
    "MnistClassifier": ConvClassifier,
    "MixerClassifier": MixerClassifier,
}


def build_classifier(config: ClassifierConfig) -> Classifier:
    """The network ``config.architecture`` names, freshly initialised."""
    return NETWORKS[config.architecture](config)


def load_classifier(path: str | Path, role: str = "model") -> Classifier:
    """The classifier saved in ``path`` (config.json + model.safetensors), in eval mode on the CPU."""
    from safetensors.torch import load_file

    root = Path(path)
    if not is_classifier_dir(root) or not (root / WEIGHTS).is_file():
        raise StillroomError(
            f"{role} '{path}' is not a classifier directory",
            f"give a directory with config.json (architecture {' or '.join(ARCHITECTURES)}) and {WEIGHTS}",
        )
    try:
        config = ClassifierConfig.model_validate_json((root / "config.json").read_text(encoding="utf-8"))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StillroomError(
            f"{role} '{path}' config.json: {where}: {first['msg']}", "fix config.json"
        ) from None
    model = build_classifier(config)
    try:
        model.load_state_dict(load_file(str(root / WEIGHTS), device="cpu"))
    except RuntimeError as err:
        raise StillroomError(
            f"{role} '{path}': {WEIGHTS} does not fit its config.json ({' '.join(str(err).split())[:160]})",
            "save the weights and the config together",
        ) from None
    return model.eval()


def save_classifier(model: Classifier, out_dir: Path) -> None:
    from safetensors.torch import save

    out_dir = Path(out_dir)
    write_json(out_dir / "config.json", model.config.model_dump(mode="json"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(out_dir / WEIGHTS, save(state))
