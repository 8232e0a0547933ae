"""The ONNX Runtime backend: an exported step run over the same live buffers, same capsules.

``OnnxModel`` has the interface the engine, decode and pipeline use from ``HybridModel``
(``live``, ``forward``, ``read_meta``/``write_meta``, ``fingerprint``, ``execution``, ``logits``,
``token_embedding``, ``embed_tokens``, ...), so every capsule verb works unchanged.

Binding (``export/step.py`` says what the graph takes and gives):
* the KV input is a *prefix* of the position-major arena ``live.regions["kv.<dtype>"][:W]``:
  contiguous, bound in place, ``W`` a power of two from the export's window floor, so there is one
  binding per window size;
* the constant-size state ping-pongs between two buffers: a step reads buffer ``a`` and writes
  buffer ``b`` (ONNX Runtime does not promise that an input and an output may share memory), then
  ``b`` becomes the live region. Both bindings (a->b, b->a) exist per window size, all made at
  load: nothing is bound on the query path;
* the new KV rows come out into a small staging buffer and are copied to ``arena[pos:pos+n]``:
  the context itself is never rewritten;
* a restore stays one copy: into whichever state buffer is live, and into the arena.
Logits are a torch matmul with the exported head weights (``head.safetensors``), as
``Family.logits`` computes them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from ..capsule import Fingerprint, Kind, LiveState
from ..capsule.layout import region_key
from ..export.manifest import (FINGERPRINT, HEAD, Export, ExportMismatch, read_export,
                               with_max_len)
from ..models.spec import ModelLoadError, TokenEmbedding, load_tokenizer

_NP = {torch.float32: "float32", torch.int64: "int64"}


@dataclass
class OnnxSpec:
    """Where the export came from (``pipeline.describe`` prints it)."""

    root: str
    source: str
    device: str = "cpu"

    def describe(self) -> str:
        return f"ONNX export {self.root} (of {self.source})"


class _Graph:
    """One exported step (``tokens`` rows per run): session, staging buffers, bindings."""

    def __init__(self, session: Any, tokens: int, hidden: int, kv_width: int, dtype: torch.dtype) -> None:
        self.session, self.tokens = session, tokens
        self.embeds = torch.zeros(tokens, hidden, dtype=dtype)
        self.position = torch.zeros(1, dtype=torch.int64)
        self.hidden = torch.zeros(tokens, hidden, dtype=dtype)
        self.kv_new = torch.zeros(tokens, kv_width, dtype=dtype)
        self.bindings: dict[tuple[int, int], Any] = {}   # (window, parity) -> IOBinding


def _bind(binding: Any, name: str, t: torch.Tensor, output: bool = False) -> None:
    import numpy as np
    args = (name, "cpu", 0, np.dtype(_NP[t.dtype]), tuple(t.shape), t.data_ptr())
    (binding.bind_output if output else binding.bind_input)(*args)


class OnnxModel:
    """An ONNX export bound to one live buffer set (see the module docstring)."""

    def __init__(self, export: Export, max_len: int, threads: int | None = None) -> None:
        import onnxruntime as ort
        man = export.manifest
        self.export = export
        self.spec = OnnxSpec(str(export.root), man.get("source", "?"))
        self.layout = with_max_len(export.layout, max_len)
        # the fingerprint the torch backend has for this layout, on this execution path
        self.fingerprint = Fingerprint(**{**export.fingerprint.to_dict(), "layout": self.layout.digest()})
        self.live = LiveState(self.layout, "cpu")
        self.hidden_size = int(man["hidden_size"])
        self.window_floor = int(man["window_floor"])
        self.position = 0
        self._flags = [False] * int(man["num_flags"])
        self._eos = frozenset(int(i) for i in man["eos_token_ids"])
        self.tokenizer = load_tokenizer(export.root)
        self.runner = None       # no CUDA graphs here; the attribute the pipeline reads
        self.lean_error = None
        self._last: tuple[torch.Tensor, int] | None = None
        dtype = self.layout.dtypes(True)[0]
        self.dtype = dtype
        self._kv_key = region_key(True, dtype)
        st_dtypes = self.layout.dtypes(False)
        self._state_key = region_key(False, st_dtypes[0]) if st_dtypes else None
        # ping-pong: the live state region and its twin; views of both, swapped together
        self._state = [self.live.regions[self._state_key], torch.zeros_like(self.live.regions[self._state_key])] \
            if self._state_key else []
        self._views = [dict(self.live.views), self._twin_views()] if self._state_key else []
        self._parity = 0
        self._head(export)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # recurrent state decays toward zero; denormals are ~20x slower on x86 (as in HybridModel)
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        kv_w = self.live.regions[self._kv_key].shape[1]
        st_w = self._state[0].shape[0] if self._state else 0
        self._graphs: dict[str, _Graph] = {}
        for kind in ("decode", "append"):
            g = export.graph(kind)
            if g is None:
                continue
            session = ort.InferenceSession(str(export.root / g["file"]), opts,
                                           providers=["CPUExecutionProvider"])
            self._check_graph(session, g["file"], kv_w, st_w)
            self._graphs[kind] = _Graph(session, int(g["tokens"]), self.hidden_size, kv_w, dtype)
        self._windows = self._window_sizes()
        for graph in self._graphs.values():  # every binding now: nothing is bound while serving
            for w in self._windows:
                for parity in range(len(self._state) or 1):
                    graph.bindings[(w, parity)] = self._make_binding(graph, w, parity)
        self.model = SimpleNamespace(config=SimpleNamespace(model_type=export.model_type,
                                                            hidden_size=self.hidden_size,
                                                            vocab_size=man["vocab_size"]),
                                     dtype=dtype, parameters=self._parameters)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, max_len: int, threads: int | None = None) -> "OnnxModel":
        """Load an export directory; refused (``ModelLoadError`` naming the part) when its
        fingerprint, layout and graphs disagree."""
        try:
            export = read_export(root)
        except ExportMismatch as e:
            raise ModelLoadError(f"ONNX export {root}: {FINGERPRINT} and the model {e}") from e
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"ONNX export {root}: {e}") from e
        return cls(export, max_len, threads)

    def _check_graph(self, session: Any, name: str, kv_w: int, st_w: int) -> None:
        """The graph's state inputs must be the layout's regions (else: a mismatched pair)."""
        shapes = {i.name: i.shape for i in session.get_inputs()}
        if shapes.get("kv", [None, None])[1] != kv_w or (st_w and shapes.get("state") != [st_w]):
            raise ModelLoadError(f"ONNX export {self.export.root}: {FINGERPRINT} and the model "
                                 f"differ in layout: {name} takes kv {shapes.get('kv')} and state "
                                 f"{shapes.get('state')}, the layout has rows of {kv_w} and a "
                                 f"state of {st_w}")

    def _head(self, export: Export) -> None:
        from safetensors.torch import load_file
        tensors = load_file(str(export.root / HEAD))
        head = export.manifest["head"]
        self._embed = torch.nn.Embedding.from_pretrained(tensors["embed"], freeze=True)
        self._lm_head = tensors["embed"] if head["tied"] else tensors["lm_head"]
        self._emb_scale = float(head["embedding_scale"])
        self._logits_mul, self._logits_div = head["logits_mul"], head["logits_div"]
        self._float_logits = bool(head["float_logits"])

    def _parameters(self) -> Iterator[torch.Tensor]:
        # the head only: the backbone's weights live inside the graphs
        return iter((self._embed.weight, self._lm_head))

    def _twin_views(self) -> dict[str, torch.Tensor]:
        views, offset, twin = dict(self.live.views), 0, self._state[1]
        for s in self.layout.specs:
            if s.kind is not Kind.KV:
                views[s.name] = twin[offset:offset + s.row_elems].view(s.shape)
                offset += s.row_elems
        return views

    def _window_sizes(self) -> list[int]:
        sizes, w = [], min(self.window_floor, self.max_len)
        while True:
            sizes.append(w)
            if w >= self.max_len:
                return sizes
            w = min(w * 2, self.max_len)

    def window_for(self, valid: int) -> int:
        """The KV rows a step at ``valid`` context rows binds (the smallest window holding them)."""
        return next(w for w in self._windows if w >= valid)

    def _make_binding(self, g: _Graph, window: int, parity: int) -> Any:
        b = g.session.io_binding()
        _bind(b, "embeds", g.embeds)
        _bind(b, "position", g.position)
        _bind(b, "kv", self.live.regions[self._kv_key][:window])
        _bind(b, "hidden", g.hidden, output=True)
        _bind(b, "kv_new", g.kv_new, output=True)
        if self._state:
            _bind(b, "state", self._state[parity])
            _bind(b, "state_new", self._state[1 - parity], output=True)
        return b

    # -- the interface the engine uses -----------------------------------------------------
    @property
    def execution(self) -> str:
        return self.fingerprint.execution

    @property
    def captures(self) -> int:
        return 0

    @property
    def max_len(self) -> int:
        return self.layout.max_len

    @property
    def num_flags(self) -> int:
        return len(self._flags)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def append_tokens(self) -> int:
        """Tokens one append run takes (1: appends run as decode steps)."""
        g = self._graphs.get("append")
        return g.tokens if g is not None else 1

    def empty_meta(self) -> dict[str, Any]:
        return {"position": 0, "flags": [False] * len(self._flags)}

    def read_meta(self) -> dict[str, Any]:
        return {"position": self.position, "flags": list(self._flags)}

    def write_meta(self, meta: dict[str, Any], write_device: bool = True) -> None:
        flags = meta["flags"]
        if len(flags) != len(self._flags):
            raise ValueError(f"meta has {len(flags)} layer flags, model has {len(self._flags)}")
        # The graph always runs the linear layers' decode path over the state it is given; the
        # flags are kept so capsules carry what the torch backend reads (True once a step ran).
        self._flags = [bool(f) for f in flags]
        self.position = int(meta["position"])

    def token_embedding(self) -> TokenEmbedding:
        emb = getattr(self, "_token_embedding", None)
        if emb is None:
            emb = self._token_embedding = TokenEmbedding(self._embed, self._emb_scale)
        return emb

    @torch.no_grad()
    def embed_tokens(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        return self.token_embedding()(ids)

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append ``embeds`` [n, hidden]; return hidden states [n, hidden]. Full append chunks
        (when the export has one) run as one session run each, the rest one token per run."""
        n = embeds.shape[0]
        if self.position + n > self.max_len:
            raise ValueError(f"append of {n} at {self.position} exceeds context {self.max_len}")
        embeds = embeds.to(device="cpu", dtype=self.dtype)
        out = torch.empty(n, self.hidden_size, dtype=self.dtype)
        i = 0
        append = self._graphs.get("append")
        while i < n:
            g = append if append is not None and n - i >= append.tokens else self._graphs["decode"]
            out[i:i + g.tokens] = self._run(g, embeds[i:i + g.tokens])
            i += g.tokens
        self._last = None
        return out

    def _run(self, g: _Graph, rows: torch.Tensor) -> torch.Tensor:
        pos = self.position
        g.embeds.copy_(rows)
        g.position.fill_(pos)
        g.session.run_with_iobinding(g.bindings[(self.window_for(max(pos, 1)), self._parity)])
        self.live.regions[self._kv_key][pos:pos + g.tokens].copy_(g.kv_new)  # only the new rows
        if self._state:  # the output buffer becomes the live state (ping-pong, no copy)
            self._parity ^= 1
            self.live.regions[self._state_key] = self._state[self._parity]
            self.live.views = self._views[self._parity]
        self.position = pos + g.tokens
        self._flags = [True] * len(self._flags)
        return g.hidden

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``Family.logits`` over the exported head weights."""
        logits = torch.nn.functional.linear(hidden.to(self._lm_head.dtype), self._lm_head)
        if self._logits_mul is not None:
            logits = logits * self._logits_mul
        if self._logits_div is not None:
            logits = logits / self._logits_div
        return logits.float() if self._float_logits else logits

    @torch.no_grad()
    def next_token(self, hidden_last: torch.Tensor) -> int:
        return int(self.logits(hidden_last).argmax())

    def warm_up(self, max_tokens: int | None = None) -> dict[str, Any]:
        """Run each graph once on scratch state (loads kernels, first-run allocations); the live
        state and metadata are unchanged."""
        t0 = time.perf_counter()
        saved = {k: r.clone() for k, r in self.live.regions.items()}
        meta, parity = self.read_meta(), self._parity
        for g in self._graphs.values():
            if self.position + g.tokens <= self.max_len:
                self._run(g, torch.zeros(g.tokens, self.hidden_size, dtype=self.dtype))
                self.write_meta(meta)
        if self._parity != parity:  # back to the buffer that was live
            self._parity = parity
            self.live.regions[self._state_key] = self._state[parity]
            self.live.views = self._views[parity]
        for k, r in self.live.regions.items():
            r.copy_(saved[k])
        self.write_meta(meta)
        return {"execution": self.execution, "variants": len(self._graphs) * len(self._windows),
                "captures": 0, "seconds": time.perf_counter() - t0}

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.export.root), "graphs": sorted(self._graphs),
                "windows": self._windows, "append": self.export.manifest.get("append")}


def default_export_dir(weights_id: str, dtype: str, ros_home: str | None = None) -> Path:
    """Where the node keeps the export of a configured model: $ROS_HOME/capsule_ros/onnx/<id>."""
    import os
    root = Path(ros_home or os.environ.get("ROS_HOME") or Path.home() / ".ros")
    return root / "capsule_ros" / "onnx" / f"{weights_id}-{dtype}"



def _weights_id(spec: Any) -> str:
    """The weights part the torch backend's fingerprint has for ``spec`` (``hybrid.py``'s rule),
    without building the model."""
    from ..capsule.fingerprint import hash_files, hash_text
    from ..models.hybrid import _checkpoint_weights
    if spec.path:
        return hash_files(_checkpoint_weights(Path(spec.path).expanduser()))
    doc = json.loads(Path(spec.config_file).read_text())
    return hash_text(json.dumps({"config": doc, "seed": spec.seed}, sort_keys=True))


def load_for_node(spec: Any, threads: int = 0, ros_home: str | None = None) -> OnnxModel:
    """The node's ``model.backend: onnxruntime``: ``model.path`` naming an export directory is
    loaded as it is; otherwise the configured model's export under ROS_HOME is loaded, made first
    (torch.onnx, once) when absent. Refused with the reason: a family that does not export, a
    dtype or device the CPU provider does not run, an export that is not the configured model."""
    from ..export.manifest import MANIFEST, NOT_EXPORTABLE
    if spec.device != "cpu":
        raise ModelLoadError(f"model.backend onnxruntime runs the CPU provider here, not "
                             f"model.device {spec.device!r} (see README: ONNX Runtime on Jetson)")
    if spec.path and (Path(spec.path).expanduser() / MANIFEST).is_file():
        return OnnxModel.load(spec.path, spec.max_len, threads or None)
    doc_path = Path(spec.path or "").expanduser() / "config.json" if spec.path else Path(spec.config_file)
    model_type = json.loads(doc_path.read_text()).get("model_type", "") if doc_path.is_file() else ""
    if model_type in NOT_EXPORTABLE:
        raise ModelLoadError(f"model.backend onnxruntime: {model_type} does not export to ONNX: "
                             f"{NOT_EXPORTABLE[model_type]}")
    weights = _weights_id(spec)
    root = default_export_dir(weights, spec.dtype, ros_home)
    if not (root / MANIFEST).is_file():
        from ..export.onnx_export import export_model
        export_model(spec, root)
    from ..models.hybrid import _versions
    expect = Fingerprint(weights=weights, dtype=spec.dtype, layout="", device="cpu",
                         versions=_versions(), execution="")
    model = OnnxModel.load(root, spec.max_len, threads or None)
    diff = [p for p in model.fingerprint.diff(expect) if p in ("weights", "dtype", "versions")]
    if diff:
        raise ModelLoadError(f"ONNX export {root} is not the configured model: differs in "
                             + ", ".join(diff) + " (delete it to export again)")
    return model
