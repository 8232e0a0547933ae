"""What a model is, without building one: its spec, load errors, the tokenizer and the token
embedding view. No transformers import here (the ONNX Runtime backend runs without it);
``hybrid.py`` builds the transformers model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class ModelLoadError(Exception):
    """The model could not be built or loaded; the message names what is missing or wrong."""


@dataclass
class ModelSpec:
    """Where the model comes from: a shipped config built with a seed, or a local checkpoint."""

    config_file: str | None = None   # JSON: {"model_type": ..., "config": {...}}
    path: str | None = None          # checkpoint directory (config.json + *.safetensors)
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_len: int = 4096

    def describe(self) -> str:
        return f"checkpoint {self.path}" if self.path else f"seeded config {self.config_file} (seed {self.seed})"


def offline() -> None:
    """No network at run time: the hub is offline for this process from the first load on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:  # huggingface_hub reads the variable at import; set its constant too when imported
        import huggingface_hub.constants as hub_constants
        hub_constants.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover - hub internals moved; the variables still apply
        pass


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer when it ships tokenizer files, else None (byte fallback)."""
    root = Path(path)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        return None
    offline()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"checkpoint {root}: tokenizer files present but unusable: {e}") from e


class TokenEmbedding(torch.nn.Module):
    """Token ids -> what the base model expects as ``inputs_embeds`` for them.

    The model's own table, times the family's input scale when the base model applies one only on
    its ``input_ids`` path (Falcon-H1). Looks like an ``nn.Embedding`` to the text encoder
    (``weight``, ``num_embeddings``, ``embedding_dim``); it owns no parameters of its own.
    """

    def __init__(self, table: torch.nn.Embedding, scale: float) -> None:
        super().__init__()
        self.__dict__["table"] = table  # not a submodule: the table belongs to the model
        self.scale = float(scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids) * self.scale
