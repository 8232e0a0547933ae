"""State layout and the live buffer set.

The live state is a closed set of named, preallocated buffers. It is laid out so that the
operations on it are few large copies:

* every KV buffer (one K and one V per attention layer) lives in one *position-major* arena per
  dtype: row ``p`` holds every layer's K and V for token position ``p``. The valid KV of a
  boundary at position ``n`` is then the contiguous prefix ``arena[:n]``, and the rows a query
  appended are the contiguous slice ``arena[p0:p1]``. The model sees each buffer through a
  strided view with its usual ``[batch, heads, max_len, head_dim]`` shape.
* every constant-size buffer (conv state, recurrent state) lives in one flat region per dtype.

So a snapshot or restore is one copy per region, whatever the number of layers.
This module imports neither ROS nor a model: it receives buffer specs.
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass

import torch


class Kind(str, enum.Enum):
    KV = "kv"
    CONV = "conv"
    RECURRENT = "recurrent"
    META = "meta"


@dataclass(frozen=True)
class BufferSpec:
    """One named buffer as the model sees it.

    ``seq_axis`` is the axis that grows with the context (KV only); its size in ``shape`` is the
    allocated maximum. Constant-size state has ``seq_axis=None``.
    """

    name: str
    kind: Kind
    dtype: torch.dtype
    shape: tuple[int, ...]
    seq_axis: int | None = None

    def __post_init__(self) -> None:
        if (self.kind is Kind.KV) != (self.seq_axis is not None):
            raise ValueError(f"{self.name}: KV buffers and only KV buffers have a seq_axis")

    @property
    def row_elems(self) -> int:
        """Elements per token position (KV) or in total (constant-size state)."""
        if self.seq_axis is None:
            return math.prod(self.shape)
        return math.prod(s for i, s in enumerate(self.shape) if i != self.seq_axis)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind.value, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape), "seq_axis": self.seq_axis}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class StateLayout:
    """The fixed set of buffers of one model instance, and the context limit."""

    specs: tuple[BufferSpec, ...]
    max_len: int

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate buffer names in layout")

    def dtypes(self, kv: bool) -> list[torch.dtype]:
        """Dtypes of the KV (or constant-size) buffers, in first-seen order: one region each."""
        seen: list[torch.dtype] = []
        for s in self.specs:
            if (s.kind is Kind.KV) == kv and s.dtype not in seen:
                seen.append(s.dtype)
        return seen

    def describe(self) -> dict:
        return {"max_len": self.max_len, "buffers": [s.describe() for s in self.specs]}

    def digest(self) -> str:
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def kv_row_bytes(self) -> int:
        return sum(s.row_elems * s.dtype.itemsize for s in self.specs if s.kind is Kind.KV)

    def state_bytes(self) -> int:
        return sum(s.row_elems * s.dtype.itemsize for s in self.specs if s.kind is not Kind.KV)


def region_key(kv: bool, dtype: torch.dtype) -> str:
    """Name of a region: ``kv.float32``, ``state.bfloat16``. Used in capsules and files."""
    return f"{'kv' if kv else 'state'}.{dtype_name(dtype)}"


class LiveState:
    """The one live buffer set: regions allocated once, named views handed to the model.

    Python-side metadata (position, flags, RNG state) is not here: the model adapter reads and
    writes it, and the capsule carries it.
    """

    def __init__(self, layout: StateLayout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.regions: dict[str, torch.Tensor] = {}
        self.views: dict[str, torch.Tensor] = {}
        for kv in (True, False):
            for dtype in layout.dtypes(kv):
                members = [s for s in layout.specs if (s.kind is Kind.KV) == kv and s.dtype == dtype]
                width = sum(s.row_elems for s in members)
                key = region_key(kv, dtype)
                if kv:
                    region = torch.zeros(layout.max_len, width, dtype=dtype, device=self.device)
                else:
                    region = torch.zeros(width, dtype=dtype, device=self.device)
                self.regions[key] = region
                offset = 0
                for spec in members:
                    self.views[spec.name] = self._view(region, spec, offset)
                    offset += spec.row_elems

    def _view(self, region: torch.Tensor, spec: BufferSpec, offset: int) -> torch.Tensor:
        n = spec.row_elems
        if spec.seq_axis is None:
            return region[offset:offset + n].view(spec.shape)
        # Position-major storage [max_len, *other dims], permuted so the model sees its own shape.
        others = [s for i, s in enumerate(spec.shape) if i != spec.seq_axis]
        stored = region[:, offset:offset + n].view(self.layout.max_len, *others)
        order = list(range(1, len(spec.shape)))
        order.insert(spec.seq_axis, 0)
        return stored.permute(*order)

    def kv_regions(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.regions.items() if k.startswith("kv.")}

    def state_regions(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.regions.items() if k.startswith("state.")}

    def view(self, name: str) -> torch.Tensor:
        return self.views[name]

    def scrub(self) -> None:
        """Overwrite every live byte with garbage (tests use it to prove restores are complete)."""
        gen = torch.Generator(device="cpu").manual_seed(0xBAD)
        for region in self.regions.values():
            noise = torch.randn(region.shape, generator=gen, dtype=torch.float32)
            region.copy_(noise.to(region.dtype))
