"""Attention over the valid part of the static KV buffer, not the allocated maximum.

A ``StaticCache`` hands attention its whole ``[.., max_len, ..]`` K/V buffers, so every step
scans ``max_len`` rows whatever the context (measured under a plain CUDA-graph capture: decode
at 16k cost twice decode at 2k). Here each step sees a *window*: the first ``W`` rows, with ``W``
the smallest power of two (from ``floor``) that holds the positions it writes. Because the KV
arena is position-major, a window is just a shorter view of the same memory: same addresses, so
captured graphs stay valid, one graph per window size.

The mask is built here too (``True`` = attend, causal over absolute positions), from a position
tensor, so it is computed on the device inside a captured graph. Masked rows past the valid
length contribute exactly zero: a window changes cost, not results.
"""
from __future__ import annotations

import torch

# Mask keys transformers' hybrid models read: attention layers get the causal mask; recurrent,
# conv and MLP layers get None (their padding mask; we never pad).
_ATTENTION_KEYS = ("full_attention",)


class MaskMap(dict):
    """The ``attention_mask`` dict a hybrid model's forward accepts, one mask for every key.

    ``None`` for attention means plain causal over exactly the given rows (SDPA's is_causal)."""

    def __init__(self, mask: torch.Tensor | None) -> None:
        super().__init__(full_attention=mask)
        self.mask = mask

    def __missing__(self, key: str) -> torch.Tensor | None:
        return self.get(key)

    def get(self, key: str, default: object = None) -> torch.Tensor | None:  # type: ignore[override]
        return self.mask if key in _ATTENTION_KEYS else None


def window_for(needed: int, max_len: int, floor: int = 256) -> int:
    """Smallest power-of-two window (>= floor) holding ``needed`` rows, capped at ``max_len``."""
    if needed > max_len:
        raise ValueError(f"{needed} rows exceed the context {max_len}")
    window = floor
    while window < needed:
        window *= 2
    return min(window, max_len)


def causal_mask(positions: torch.Tensor, window: int, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, n, window] mask for queries at ``positions`` [1, n] over key rows [0, window)."""
    keys = torch.arange(window, device=positions.device)
    allowed = keys[None, :] <= positions[0][:, None]
    if attn_impl == "eager":  # additive mask
        zero = torch.zeros((), dtype=dtype, device=positions.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]
    return allowed[None, None]


class KVWindow:
    """Points each attention layer's cache at a window of the live K/V views."""

    def __init__(self, attn_layers: list, full_views: list[tuple[torch.Tensor, torch.Tensor]],
                 max_len: int, floor: int = 256) -> None:
        self.layers = attn_layers
        self.full = full_views
        self.max_len = max_len
        self.floor = floor
        self.current: int | None = None

    def window_for(self, needed: int) -> int:
        return window_for(needed, self.max_len, self.floor)

    def apply(self, window: int) -> None:
        """Make every attention layer read and write only rows [0, window)."""
        if window == self.current:
            return
        for layer, (k, v) in zip(self.layers, self.full):
            layer.keys = k[:, :, :window]
            layer.values = v[:, :, :window]
            layer.max_cache_len = window
        self.current = window
