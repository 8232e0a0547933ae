"""Graph-bound execution on CUDA: the model step captured as CUDA graphs over the live buffers.

Every captured step reads and writes the live state at fixed addresses, so a restore (a copy
into those same buffers) needs no recapture: the next replay continues from the restored state.

One graph per variant ``(chunk, window, path)``:
* ``chunk``: tokens appended by one replay, a power of two up to ``max_chunk`` (1 is the decode
  step). An append of n tokens replays its binary decomposition, largest first (n=33: 32+1), so
  a restore-then-append repeats the same chunks as a cold run of the same history.
* ``window``: the KV rows attention reads (kv_window.py): cost follows the valid length.
* ``path``: transformers chooses code paths with Python state a graph cannot see
  (``has_previous_state`` flags; ``seq_len == 1`` branches, covered by the chunk). ``first`` is
  the prefill of an empty context (flags off), ``cont`` continues from a state (flags on); the
  variant is picked from the live metadata. Replays do not run Python, so after each one the
  runner sets what the captured code would have set (position, flags).

Captured inputs are static tensors: the chunk's embeddings and one device scalar, the start
position; positions and the causal mask are computed from it inside the graph. The first token
(argmax of the last position's logits) is computed in the graph too. Sampling stays outside
the graph, eagerly, with the stream's generator whose state travels in the capsule.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .kv_window import MaskMap, causal_mask, window_for


def decompose(n: int, max_chunk: int) -> list[int]:
    """n as a sum of powers of two <= max_chunk, largest first (33 -> [32, 1])."""
    if n <= 0:
        raise ValueError("append of no tokens")
    out = []
    while n:
        c = min(max_chunk, 1 << (n.bit_length() - 1))
        out.append(c)
        n -= c
    return out


@contextlib.contextmanager
def kept_state(model: Any) -> Iterator[None]:
    """The model's live buffers and metadata as they were, whatever runs inside (probe inputs,
    capture warm-ups and captures write into them)."""
    regions, meta = {k: r.clone() for k, r in model.live.regions.items()}, model.read_meta()
    try:
        yield
    finally:
        for k, r in model.live.regions.items():
            r.copy_(regions[k])
        model.write_meta(meta)


def record(fn: Callable[[], Any], device: torch.device, pool: Any,
           setup: Callable[[], None] = lambda: None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` captured as a CUDA graph in ``pool``, and what it returned. Two runs on a side
    stream first, so lazy initialisation, compilation, autotuning and workspace allocation stay
    out of the graph; ``setup`` runs before each run and before the capture (what a variant
    expects of the live metadata)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            setup()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    setup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def _backends(names: list | None):
    """``sdpa_kernel`` over backends named like ``["EFFICIENT_ATTENTION", "MATH"]``."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor   # [1, chunk, hidden], written by each replay
    logits: torch.Tensor   # [vocab] of the chunk's last position
    token: torch.Tensor    # argmax of logits


class GraphRunner:
    def __init__(self, model, max_chunk: int = 512, sdpa_backends: list | None = None) -> None:
        if model.live.device.type != "cuda":
            raise ValueError("graph-bound execution needs the live state on a CUDA device")
        if max_chunk & (max_chunk - 1):
            raise ValueError("max_chunk must be a power of two")
        self.model = model
        self.max_chunk = max_chunk
        self.device = model.live.device
        self.dtype = getattr(torch, model.spec.dtype)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, str], _Captured] = {}
        self.base_pos = torch.zeros((), dtype=torch.long, device=self.device)
        self._inputs: dict[int, torch.Tensor] = {}
        self._aranges: dict[int, torch.Tensor] = {}
        self.captures = 0
        self.replays = 0
        # Attention backends allowed inside captured steps (None: PyTorch's choice). Measured on
        # an H200: with our explicit mask PyTorch picks cuDNN, ~200 us for a one-query decode.
        self.sdpa_backends = sdpa_backends

    # -- capture ---------------------------------------------------------------------------
    def _input(self, chunk: int) -> torch.Tensor:
        if chunk not in self._inputs:
            self._inputs[chunk] = torch.zeros(1, chunk, self.model.hidden_size, dtype=self.dtype,
                                              device=self.device)
            self._aranges[chunk] = torch.arange(chunk, device=self.device)
        return self._inputs[chunk]

    def _step(self, chunk: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured function: one chunk at ``base_pos``, reading ``window`` KV rows."""
        m = self.model
        positions = (self.base_pos + self._aranges[chunk])[None]
        mask = causal_mask(positions, window, m.model.config._attn_implementation, self.dtype)
        with _backends(self.sdpa_backends):
            out = m.model.model(inputs_embeds=self._input(chunk), cache=m.cache, use_cache=True,
                                position_ids=positions, attention_mask=MaskMap(mask))
        hidden = out.last_hidden_state
        logits = m.logits(hidden[0, -1])
        return hidden, logits, logits.argmax()

    def _prepare(self, chunk: int, window: int, path: str) -> None:
        """Put the live metadata in the state a variant expects (capture runs on scratch data)."""
        start = 0 if path == "first" else window - chunk
        self.model.write_meta({"position": start, "flags": [path == "cont"] * self.model.num_flags})
        self.base_pos.fill_(start)
        self.model.window.apply(window)

    @torch.no_grad()
    def capture(self, chunk: int, window: int, path: str) -> _Captured:
        """Capture one variant. The live state is saved and put back: capture writes into it."""
        key = (chunk, window, path)
        if key in self.graphs:
            return self.graphs[key]
        with kept_state(self.model):
            self._input(chunk).normal_()  # no zeros: they can hide unwritten paths
            graph, (hidden, logits, token) = record(
                lambda: self._step(chunk, window), self.device, self.pool,
                setup=lambda: self._prepare(chunk, window, path))
        captured = _Captured(graph, hidden, logits, token)
        self.graphs[key] = captured
        self.captures += 1
        return captured

    def variants(self, max_tokens: int | None = None) -> list[tuple[int, int, str]]:
        """Every ``(chunk, window, path)`` an append of at most ``max_tokens`` tokens can reach.

        ``first`` runs only from position 0 (window of the chunk itself); ``cont`` continues from
        any position >= 1, so its window is that of any end position in (chunk, max_len].
        """
        m = self.model
        limit = min(self.max_chunk, max_tokens or self.max_chunk, m.max_len)
        floor = m.window.floor
        ends = {m.max_len}
        p = floor
        while p <= m.max_len:
            ends.update((p, p + 1))
            p *= 2
        out = []
        chunk = 1
        while chunk <= limit:
            out.append((chunk, window_for(chunk, m.max_len, floor), "first"))
            wins = {window_for(e, m.max_len, floor) for e in ends | {chunk + 1} if chunk < e <= m.max_len}
            out += [(chunk, w, "cont") for w in sorted(wins)]
            chunk *= 2
        return out

    @torch.no_grad()
    def warm_up(self, max_tokens: int | None = None) -> int:
        """Capture every reachable variant and replay each once, so that no capture (and no
        lazy kernel compilation or autotuning) happens on the query path. The live state and
        metadata are put back exactly. Returns the number of variants."""
        variants = self.variants(max_tokens)
        with kept_state(self.model):
            for chunk, window, path in variants:
                cap = self.capture(chunk, window, path)
                self._prepare(chunk, window, path)
                cap.graph.replay()
            torch.cuda.synchronize(self.device)
        return len(variants)

    # -- running ---------------------------------------------------------------------------
    def path(self) -> str:
        flags = self.model.read_meta()["flags"]
        if all(flags):
            return "cont"
        if not any(flags):
            return "first"
        raise RuntimeError("mixed has_previous_state flags: no captured variant for that state")

    @torch.no_grad()
    def append(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append ``embeds`` [n, hidden] by graph replays: (hidden [n, hidden], logits, token)."""
        m = self.model
        n = embeds.shape[0]
        if m.position + n > m.max_len:
            raise ValueError(f"append of {n} at {m.position} exceeds context {m.max_len}")
        embeds = embeds.to(self.device, self.dtype)
        outs = []
        done = 0
        cap = None
        for chunk in decompose(n, self.max_chunk):
            path = self.path()
            if path == "first" and m.position != 0:
                raise RuntimeError("flags say empty context but the position is not 0")
            window = m.window.window_for(m.position + chunk)
            cap = self.capture(chunk, window, path)
            self._inputs[chunk].copy_(embeds[done:done + chunk][None])
            self.base_pos.fill_(m.position)
            cap.graph.replay()
            self.replays += 1
            # What the captured Python did once at capture time, done again for this replay.
            m.window.apply(window)
            m.write_meta({"position": m.position + chunk, "flags": [True] * m.num_flags},
                         write_device=False)
            outs.append(cap.hidden[0].clone())
            done += chunk
        return torch.cat(outs) if len(outs) > 1 else outs[0], cap.logits.clone(), cap.token.clone()


def plan_chunks(n: int, position: int, chunks: tuple[int, ...], max_len: int) -> list[tuple[int, int]]:
    """Replays for an append of ``n`` tokens at ``position`` with chunk sizes ``chunks`` (1 among
    them): ``(chunk, rows)`` pairs. The smallest chunk that holds what is left takes it padded, in
    one replay; more than the largest chunk goes in full largest chunks first. A chunk never
    reaches past the buffer's end (its padding rows are written to K/V rows there)."""
    if n <= 0:
        raise ValueError("append of no tokens")
    if position + n > max_len:
        raise ValueError(f"append of {n} at {position} exceeds context {max_len}")
    out = []
    while n:
        fits = [c for c in chunks if c >= n and position + c <= max_len]
        if fits:
            out.append((min(fits), n))
            break
        c = max(c for c in chunks if c <= n and position + c <= max_len)
        out.append((c, c))
        position += c
        n -= c
    return out


class LeanRunner:
    """The lean forward (models/lean.py) captured as one CUDA graph per chunk size.

    Inputs of a replay: the chunk's embeddings, and two device scalars, the start position and the
    real row count, so a chunk of T rows serves every append of 1..T tokens at any position in
    one replay (7 tokens: one replay of the 16-row graph). The cold path is this same runner from
    the empty state, so cold and capsule paths run the same kernels on the same schedule.
    ``replay=False`` runs the same step uncaptured (same kernels): the eager CUDA lean path.
    """

    lean = True

    def __init__(self, model, chunks: tuple[int, ...] = (1, 16, 64, 512), max_chunk: int = 512,
                 compile: str = "none") -> None:
        from ..models.lean import LeanModel
        if model.live.device.type != "cuda":
            raise ValueError("the lean runner captures CUDA graphs: the live state must be on CUDA")
        self.model = model
        self.lean_model = LeanModel(model, compile=compile)
        limit = min(max_chunk, model.max_len)
        self.chunks = tuple(sorted({1, *(c for c in chunks if c <= limit)}))
        self.max_chunk = self.chunks[-1]
        self.device = model.live.device
        self.dtype = getattr(torch, model.spec.dtype)
        self.pool = torch.cuda.graph_pool_handle()
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.n = torch.ones((), dtype=torch.long, device=self.device)
        self._inputs = {c: torch.zeros(c, model.hidden_size, dtype=self.dtype, device=self.device)
                        for c in self.chunks}
        self.graphs: dict[int, _Captured] = {}
        self.captures = 0
        self.replays = 0

    def _step(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.lean_model.step(self._inputs[chunk], self.pos, self.n)
        last = hidden.index_select(0, (self.n - 1).reshape(1))[0]
        logits = self.model.logits(last)
        return hidden, logits, logits.argmax()

    def kept_state(self) -> contextlib.AbstractContextManager[None]:
        """The live buffers and metadata kept across what runs inside (see ``kept_state``)."""
        return kept_state(self.model)

    def record(self, fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        """``fn`` captured in this runner's pool (see ``record``)."""
        return record(fn, self.device, self.pool)

    @torch.no_grad()
    def probe(self) -> None:
        """Run every chunk size once, uncaptured, on scratch state: compiles the Triton kernels
        and the attention, so a kernel that cannot build fails here (at configure), not later."""
        with self.kept_state():
            for chunk in self.chunks:
                self._inputs[chunk].normal_()
                self.pos.fill_(0)
                self.n.fill_(chunk)
                self._step(chunk)
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def capture(self, chunk: int) -> _Captured:
        if chunk in self.graphs:
            return self.graphs[chunk]
        with self.kept_state():
            self._inputs[chunk].normal_()  # no zeros: they can hide unwritten paths
            self.pos.fill_(0)
            self.n.fill_(chunk)
            graph, (hidden, logits, token) = self.record(lambda: self._step(chunk))
        self.graphs[chunk] = _Captured(graph, hidden, logits, token)
        self.captures += 1
        return self.graphs[chunk]

    def variants(self, max_tokens: int | None = None) -> list[int]:
        """Chunk sizes an append of at most ``max_tokens`` can use (all: any length fits one)."""
        if max_tokens is None:
            return list(self.chunks)
        need = min(c for c in self.chunks if c >= min(max_tokens, self.max_chunk))
        return [c for c in self.chunks if c <= need]

    @torch.no_grad()
    def warm_up(self, max_tokens: int | None = None) -> int:
        chunks = self.variants(max_tokens)
        with self.kept_state():
            for chunk in chunks:
                cap = self.capture(chunk)
                self.pos.fill_(0)
                self.n.fill_(chunk)
                cap.graph.replay()
            torch.cuda.synchronize(self.device)
        return len(chunks)

    @torch.no_grad()
    def append(self, embeds: torch.Tensor, replay: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append ``embeds`` [n, hidden]: (hidden [n, hidden], logits, token of the last row)."""
        m = self.model
        embeds = embeds.to(self.device, self.dtype)
        outs = []
        done = 0
        for chunk, rows in plan_chunks(embeds.shape[0], m.position, self.chunks, m.max_len):
            # a chunk size met for the first time is captured before its inputs are written:
            # capturing fills the inputs, position and row count with its own probe values
            cap = self.capture(chunk) if replay else None
            self._inputs[chunk][:rows].copy_(embeds[done:done + rows])
            self.pos.fill_(m.position)
            self.n.fill_(rows)
            if cap is not None:
                cap.graph.replay()
                self.replays += 1
                hidden, logits, token = cap.hidden, cap.logits, cap.token
            else:
                hidden, logits, token = self._step(chunk)
            m.write_meta({"position": m.position + rows, "flags": [True] * m.num_flags},
                         write_device=False)
            outs.append(hidden[:rows].clone())
            done += rows
        return torch.cat(outs) if len(outs) > 1 else outs[0], logits.clone(), token.clone()
