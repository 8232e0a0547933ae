"""The model step as a pure function of explicit state, for ``torch.onnx`` export.

``StepModule(bound)(embeds, position, kv, state) -> (hidden, kv_new, state_new)``:

* ``embeds`` [n, hidden]: what ``HybridModel.forward`` takes;
* ``position`` [1] int64: the write position (the context length before this step);
* ``kv`` [W, kv_width]: the first ``W`` rows of the position-major KV arena (``kv.<dtype>``
  region), a contiguous prefix, so the runtime binds it in place. Rows at or past ``position``
  are masked (stale bytes are never read into a result);
* ``state`` [state_width]: the constant-size region (``state.<dtype>``): every conv and recurrent
  buffer, at the offsets of ``LiveState``;
* ``kv_new`` [n, kv_width]: only the appended rows, ready to copy to ``arena[position:+n]``;
* ``state_new`` [state_width]: the state after the step (constant size).

The transformers modules run unchanged: the bound model's own cache is pointed, for the trace, at
views of these inputs. Attention layers return ``cat(window, new)`` instead of writing a static
buffer (an in-place write of an input would make the exporter return the whole KV: the context
rewritten every step); linear layers mutate a clone of ``state``, which the exporter turns into
the ``state_new`` output. Every linear layer runs its *decode* path (``has_previous_state``):
from the empty state (zeros) that is the same math as transformers' prefill path.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..capsule import Kind, StateLayout


def _offsets(layout: StateLayout, kv: bool) -> dict[str, tuple[int, int]]:
    """name -> (offset, width) inside the one region of that kind (LiveState's packing)."""
    out, offset = {}, 0
    for s in layout.specs:
        if (s.kind is Kind.KV) == kv:
            out[s.name] = (offset, s.row_elems)
            offset += s.row_elems
    return out


def region_widths(layout: StateLayout) -> tuple[int, int]:
    """(kv_width, state_width): elements per KV row, and in the constant-size region."""
    kv = sum(s.row_elems for s in layout.specs if s.kind is Kind.KV)
    st = sum(s.row_elems for s in layout.specs if s.kind is not Kind.KV)
    return kv, st


def check_exportable(layout: StateLayout) -> None:
    """The exported step binds one KV region and one state region (one dtype each)."""
    kv, st = layout.dtypes(True), layout.dtypes(False)
    if len(kv) != 1 or len(st) > 1:
        raise ValueError(f"the ONNX step needs one KV dtype and at most one state dtype, "
                         f"this layout has KV {kv} and state {st}")


class _WindowUpdate:
    """An attention layer's ``update`` for the trace: attend to window + new rows, keep new rows."""

    def __init__(self, k_win: torch.Tensor, v_win: torch.Tensor) -> None:
        self.k_win, self.v_win = k_win, v_win
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.new = (key_states, value_states)
        return (torch.cat([self.k_win, key_states.to(self.k_win.dtype)], dim=2),
                torch.cat([self.v_win, value_states.to(self.v_win.dtype)], dim=2))


class StepModule(torch.nn.Module):
    """One step of a bound ``HybridModel`` with its state as inputs and outputs (see module doc)."""

    def __init__(self, bound: Any) -> None:
        super().__init__()
        self.model = bound.model
        self.__dict__["bound"] = bound  # not a submodule: the weights are registered once
        self.layout: StateLayout = bound.live.layout
        check_exportable(self.layout)
        self.kv_off = _offsets(self.layout, True)
        self.st_off = _offsets(self.layout, False)
        self.specs = {s.name: s for s in self.layout.specs}

    def _kv_view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """[W, kv_width] -> the model's [batch, heads, W, head_dim] (LiveState._view's mapping)."""
        spec = self.specs[name]
        off, n = self.kv_off[name]
        others = [s for i, s in enumerate(spec.shape) if i != spec.seq_axis]
        stored = rows[:, off:off + n].reshape(rows.shape[0], *others)
        order = list(range(1, len(spec.shape)))
        order.insert(spec.seq_axis, 0)
        return stored.permute(*order)

    def _kv_rows(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """The model's [batch, heads, n, head_dim] -> position-major [n, row_elems]."""
        spec = self.specs[name]
        order = [spec.seq_axis] + [i for i in range(len(spec.shape)) if i != spec.seq_axis]
        return t.permute(*order).reshape(t.shape[spec.seq_axis], -1)

    def forward(self, embeds: torch.Tensor, position: torch.Tensor, kv: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bound, cache = self.bound, self.bound.cache
        n, window = embeds.shape[0], kv.shape[0]
        work = state.clone()  # the linear layers write into this; it becomes state_new
        updates: list[tuple[int, _WindowUpdate]] = []
        saved = _swap_cache(cache, self, kv, work, updates)
        try:
            pos = position + torch.arange(n, dtype=torch.int64)          # [n]
            keys = torch.arange(window + n, dtype=torch.int64)           # window rows, then new
            old = (keys[None, :] < window) & (keys[None, :] < position)  # valid rows of the window
            new = (keys[None, :] >= window) & (keys[None, :] - window <= torch.arange(n)[:, None])
            mask = (old | new)[None, None]                               # [1, 1, n, W + n]
            if self.model.config._attn_implementation == "eager":
                zero = torch.zeros((), dtype=self.model.dtype)
                mask = torch.where(mask, zero, torch.finfo(self.model.dtype).min)
            masks = _mask_map(self.model.config, mask)
            out = self.model.model(inputs_embeds=embeds[None].to(self.model.dtype), cache=cache,
                                   use_cache=True, position_ids=pos[None], attention_mask=masks)
        finally:
            _restore_cache(cache, saved)
        rows = {}
        for i, upd in updates:
            k, v = upd.new
            rows[f"L{i}.k"] = self._kv_rows(k, f"L{i}.k")
            rows[f"L{i}.v"] = self._kv_rows(v, f"L{i}.v")
        kv_new = torch.cat([rows[name].to(kv.dtype) for name in self.kv_off], dim=1)
        return out.last_hidden_state[0], kv_new, work


def _mask_map(config: Any, mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """A plain dict (traceable) with the attention mask for attention layers, None elsewhere
    (what ``runtime.kv_window.MaskMap`` answers for any key)."""
    kinds = set(getattr(config, "layer_types", None) or ()) | {
        "full_attention", "linear_attention", "mamba", "attention", "conv", "mlp", "moe", "hybrid"}
    return {k: (mask if k == "full_attention" else None) for k in kinds}


def _swap_cache(cache: Any, step: StepModule, kv: torch.Tensor, work: torch.Tensor,
                updates: list) -> list:
    """Point the cache at the inputs for one traced call; returns what to put back."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin, StaticLayer
    saved = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticLayer):
            upd = _WindowUpdate(step._kv_view(kv, f"L{i}.k"), step._kv_view(kv, f"L{i}.v"))
            saved.append((layer, "update", layer.__dict__.get("update")))
            layer.update = upd  # instance attribute: Cache.update calls layers[i].update
            updates.append((i, upd))
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for j in range(layer.number_of_states):
                for part, store in (("conv", layer.conv_states), ("rec", layer.recurrent_states)):
                    name = f"L{i}.{part}{j}"
                    if name in step.st_off:
                        off, width = step.st_off[name]
                        saved.append((store, j, store[j]))
                        store[j] = work[off:off + width].view(step.specs[name].shape)
                saved.append((layer.has_previous_state, j, layer.has_previous_state[j]))
                layer.has_previous_state[j] = True  # decode path: the state is the input
    return saved


def _restore_cache(cache: Any, saved: list) -> None:
    for obj, key, value in reversed(saved):
        if key == "update":
            if value is None:
                obj.__dict__.pop("update", None)
            else:
                obj.update = value
        else:
            obj[key] = value


def window_rows(needed: int, max_len: int, floor: int) -> int:
    """Rows of the KV window a step at ``needed`` valid rows binds: a power of two >= floor (so
    few distinct bindings), never 0, capped at ``max_len``."""
    w = max(floor, 1 << max(0, math.ceil(math.log2(max(needed, 1)))))
    return min(w, max_len)
