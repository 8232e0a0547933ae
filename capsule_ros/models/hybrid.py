"""A transformers hybrid model bound to one live buffer set.

Works for every family whose transformers cache is a ``StaticCache`` of ``StaticLayer`` (attention
K/V), ``LinearAttentionLayer`` (conv + recurrent state, with Python-side ``has_previous_state``
flags) or both in one layer. The binding:

1. materialises every cache buffer with one dummy forward (transformers creates linear-layer
   buffers lazily, with the dtype of the kernel's first output), and checks their dtypes;
2. derives the state layout from those buffers;
3. re-points the cache at views of the live state, so the model reads and writes our buffers in
   place, and the capsule mechanism never needs to know what a cache is.

The Python-side flags and the attention write position are metadata: ``read_meta`` and
``write_meta`` move them in and out of capsules.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..capsule import BufferSpec, Fingerprint, Kind, LiveState, StateLayout
from ..capsule.fingerprint import hash_files, hash_text
from ..runtime.kv_window import KVWindow, MaskMap, causal_mask
from .registry import family_for
from .spec import ModelLoadError, ModelSpec, TokenEmbedding, load_tokenizer  # noqa: F401
from .spec import offline as _offline
from .torch_kernels import route_cpu_to_torch

log = logging.getLogger("capsule_ros")
POLICY_FILE = "policy.safetensors"  # see capsule_ros.policy.weights

try:  # transformers 5.x
    from transformers.cache_utils import LinearAttentionCacheLayerMixin, StaticCache, StaticLayer
    from transformers.cache_utils import StaticSlidingWindowLayer
except ImportError as e:  # pragma: no cover - pinned version has them
    raise ImportError("capsule_ros needs transformers>=5.24 (StaticCache with linear-attention layers)") from e


def _versions() -> str:
    import transformers
    return hash_text(f"torch={torch.__version__};transformers={transformers.__version__};capsule=1")


def _checkpoint_weights(root: Path) -> list[Path]:
    """The checkpoint's safetensors files; a missing file (or shard) is named in the error."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"checkpoint {root}: unreadable {index.name}: {e}") from e
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise ModelLoadError(f"checkpoint {root}: missing weight file(s) {missing} "
                                 f"(listed in {index.name})")
        return [root / s for s in shards]
    weights = sorted(root.glob("*.safetensors"))
    weights = [w for w in weights if w.name != POLICY_FILE]  # encoders/heads, not the backbone
    if not weights:
        raise ModelLoadError(f"checkpoint {root}: missing weight file model.safetensors "
                             f"(no *.safetensors besides {POLICY_FILE})")
    return weights


def load_transformers_model(spec: ModelSpec) -> tuple[torch.nn.Module, str]:
    """Build or load the causal LM. Returns (model, weights id for the fingerprint)."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    try:
        dtype = getattr(torch, spec.dtype)
        assert isinstance(dtype, torch.dtype)
    except (AttributeError, AssertionError):
        raise ModelLoadError(f"model.dtype {spec.dtype!r} is not a torch dtype") from None
    if spec.path:
        _offline()
        root = Path(spec.path).expanduser()
        if not root.is_dir():
            raise ModelLoadError(f"checkpoint directory {root} not found")
        if not (root / "config.json").is_file():
            raise ModelLoadError(f"checkpoint {root}: missing file config.json")
        weights = _checkpoint_weights(root)
        try:
            model_type = json.loads((root / "config.json").read_text()).get("model_type", "")
        except ValueError as e:
            raise ModelLoadError(f"checkpoint {root}: config.json is not JSON: {e}") from e
        try:
            family_for(model_type)
        except ValueError as e:
            raise ModelLoadError(f"checkpoint {root}: {e}") from e
        try:
            model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"checkpoint {root}: {e}") from e
        weights_id = hash_files(weights)
    elif spec.config_file:
        path = Path(spec.config_file)
        if not path.is_file():
            raise ModelLoadError(f"model config file {path} not found")
        doc = json.loads(path.read_text())
        model_type = doc["model_type"]
        family_for(model_type)  # refuses a family we have no descriptor for
        config = CONFIG_MAPPING[model_type](**doc["config"])
        # Seeded initialisation that leaves the caller's global RNG alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        weights_id = hash_text(json.dumps({"config": doc, "seed": spec.seed}, sort_keys=True))
    else:
        raise ModelLoadError("model: set either path (checkpoint directory) or config_file")
    return model.to(spec.device).eval(), weights_id


@dataclass
class _Flag:
    layer: int
    state: int


@dataclass
class HybridModel:
    """The model, its cache bound to the live state, and the metadata it needs to continue."""

    model: torch.nn.Module
    cache: Any
    live: LiveState
    fingerprint: Fingerprint
    family: Any
    spec: ModelSpec
    position: int = 0
    tokenizer: Any = None            # the checkpoint's tokenizer, when it has one
    window: KVWindow | None = None   # attention reads only a window of the KV rows
    runner: Any = None               # GraphRunner, once enable_graphs() was called (CUDA)
    use_graphs: bool = True          # with a runner: replay graphs (False: eager, same math)
    lean_error: str | None = None    # why enable_graphs(lean=True) fell back, if it did
    _flags: list[_Flag] = field(default_factory=list)
    _attn_layers: list[Any] = field(default_factory=list)
    _graph_last: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden, token) of a replay

    @classmethod
    def load(cls, spec: ModelSpec) -> "HybridModel":
        model, weights_id = load_transformers_model(spec)
        bound = cls.bind(model, spec, weights_id)
        if spec.path:
            bound.tokenizer = load_tokenizer(Path(spec.path).expanduser())
        return bound

    @classmethod
    def bind(cls, model: torch.nn.Module, spec: ModelSpec, weights_id: str) -> "HybridModel":
        config = model.config
        family = family_for(config.model_type)
        route_cpu_to_torch()  # CPU tensors never reach a Triton kernel (fla, mamba-ssm)
        if spec.device == "cpu":
            # Recurrent state decays toward zero; x86 computes on denormal floats ~20x slower
            # (measured: a 17-token append went from ~35 ms to 0.3-1.5 s). Flushing them to zero
            # is process-wide and applies to the cold and the capsule path alike.
            torch.set_flush_denormal(True)
        cache = StaticCache(config=config, max_cache_len=spec.max_len)
        device = torch.device(spec.device)
        dtype = getattr(torch, spec.dtype)
        hidden = config.hidden_size
        with torch.no_grad():
            dummy = torch.zeros(1, 2, hidden, dtype=dtype, device=device)
            model.model(inputs_embeds=dummy, cache=cache, use_cache=True,
                        position_ids=torch.arange(2, device=device)[None])
        specs, flags, attn = _derive_layout(cache, dtype, family)
        layout = StateLayout(tuple(specs), spec.max_len)
        live = LiveState(layout, device)
        _point_cache_at(cache, live)
        fp = Fingerprint(weights=weights_id, dtype=spec.dtype, layout=layout.digest(),
                         device=_device_kind(device), versions=_versions(), execution="eager")
        views = [(live.view(f"L{i}.k"), live.view(f"L{i}.v"))
                 for i, layer in enumerate(cache.layers) if layer in attn]
        bound = cls(model=model, cache=cache, live=live, fingerprint=fp, family=family, spec=spec,
                    window=KVWindow(attn, views, spec.max_len), _flags=flags, _attn_layers=attn)
        bound.write_meta(bound.empty_meta())
        return bound

    def enable_graphs(self, max_chunk: int = 512, sdpa_backends: list | None = None,
                      lean: bool = False, chunks: tuple[int, ...] = (1, 16, 64, 512),
                      compile: str = "none") -> Any:
        """Run appends as CUDA-graph replays over the live buffers (runtime/graphs.py).

        ``lean=True`` (qwen3_5_text, bamba): the lean forward (models/lean.py), one graph per
        chunk size in ``chunks``; its kernels are built here (and compiled, per ``compile``: see
        models/lean.py), and if one fails the model says so and falls back to capturing
        transformers' modules."""
        from ..runtime.graphs import GraphRunner, LeanRunner
        from .lean import LEAN_FAMILIES, execution_name
        self.runner = None
        if lean and self.model.config.model_type in LEAN_FAMILIES:
            try:
                runner = LeanRunner(self, chunks=chunks, max_chunk=max_chunk, compile=compile)
                runner.probe()
                self.runner = runner
                self.fingerprint = dataclasses.replace(self.fingerprint, execution=execution_name(compile))
                return runner
            except Exception as e:  # noqa: BLE001 - any kernel build failure: keep serving
                log.warning("lean CUDA path unavailable for %s (%s: %s); using graph-captured "
                            "transformers modules", self.model.config.model_type, type(e).__name__, e)
                self.lean_error = f"{type(e).__name__}: {e}"
        elif lean:
            log.warning("no lean forward for %s; using graph-captured transformers modules",
                        self.model.config.model_type)
        self.runner = GraphRunner(self, max_chunk=max_chunk, sdpa_backends=sdpa_backends)
        # Captured transformers modules compute what eager does (tested bit-identical per chunk),
        # but the path is named so a capsule never crosses to a path with other numerics unseen.
        self.fingerprint = dataclasses.replace(self.fingerprint, execution="graph")
        return self.runner

    @property
    def execution(self) -> str:
        """The execution path the fingerprint names: "eager", "graph", "lean-cuda[+glue|+step]"."""
        return self.fingerprint.execution

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (0 without graphs). Must not move while serving."""
        return self.runner.captures if self.runner is not None else 0

    def warm_up(self, max_tokens: int | None = None) -> dict[str, Any]:
        """Capture every graph this configuration can reach and run each once, so that no
        capture, compilation or autotuning happens on the query path; ``max_tokens`` bounds one
        ``forward`` (the engine's ``chunk_size``). The live state and metadata are unchanged.
        Without graphs (CPU, or graphs off) it runs one eager step on scratch state instead,
        which loads the kernels; ``captures`` stays 0 there."""
        t0 = time.perf_counter()
        if self.runner is not None:
            variants = self.runner.warm_up(max_tokens)
        else:
            saved = {k: r.clone() for k, r in self.live.regions.items()}
            meta = self.read_meta()
            if self.position < self.max_len:
                with torch.no_grad():
                    self.forward(torch.zeros(1, self.hidden_size, dtype=self.model.dtype,
                                             device=self.live.device))
            for k, r in self.live.regions.items():
                r.copy_(saved[k])
            self.write_meta(meta)
            variants = 0
        return {"execution": self.execution, "variants": variants, "captures": self.captures,
                "seconds": time.perf_counter() - t0}

    # -- metadata --------------------------------------------------------------------------
    def empty_meta(self) -> dict[str, Any]:
        return {"position": 0, "flags": [False] * len(self._flags)}

    def read_meta(self) -> dict[str, Any]:
        """Everything outside the buffers that the next step reads."""
        flags = [bool(self.cache.layers[f.layer].has_previous_state[f.state]) for f in self._flags]
        return {"position": self.position, "flags": flags}

    @property
    def num_flags(self) -> int:
        return len(self._flags)

    def write_meta(self, meta: dict[str, Any], write_device: bool = True) -> None:
        """Set flags and position; ``write_device=False`` when a graph replay already advanced
        the attention layers' device-side write position."""
        flags = meta["flags"]
        if len(flags) != len(self._flags):
            raise ValueError(f"meta has {len(flags)} layer flags, model has {len(self._flags)}")
        for f, value in zip(self._flags, flags):
            self.cache.layers[f.layer].has_previous_state[f.state] = bool(value)
        self.position = int(meta["position"])
        # transformers' cache keeps its write position on the device; the lean step never reads
        # it (its position is the runner's), so a restore there launches no kernel for it
        if write_device and not getattr(self.runner, "lean", False):
            for layer in self._attn_layers:
                layer.cumulative_length.fill_(self.position)

    # -- running ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_len(self) -> int:
        return self.live.layout.max_len

    def token_embedding(self) -> TokenEmbedding:
        """Token ids -> ``inputs_embeds`` rows, as the model's ``input_ids`` path makes them."""
        emb = getattr(self, "_token_embedding", None)
        if emb is None:
            emb = TokenEmbedding(self.model.get_input_embeddings(),
                                 self.family.embedding_scale(self.model.config))
            object.__setattr__(self, "_token_embedding", emb)
        return emb

    @torch.no_grad()
    def embed_tokens(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` embeddings of token ids (what ``forward``/``engine.extend`` take)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.live.device).reshape(-1)
        return self.token_embedding()(ids)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """End-of-sequence ids: the tokenizer's, else the model config's (int or list)."""
        ids: set[int] = set()
        for source in (self.tokenizer, self.model.config, getattr(self.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append ``embeds`` [n, hidden] at the current position; return hidden states [n, hidden]."""
        n = embeds.shape[0]
        if self.position + n > self.max_len:
            raise ValueError(f"append of {n} at {self.position} exceeds context {self.max_len}")
        lean = getattr(self.runner, "lean", False)
        if self.runner is not None and (self.use_graphs or lean):
            # the lean path is the same kernels captured or not; use_graphs picks which
            hidden, _, token = (self.runner.append(embeds, replay=self.use_graphs) if lean
                                else self.runner.append(embeds))
            self._graph_last = (hidden, token)
            return hidden
        self._graph_last = None
        device = self.live.device
        pos = torch.arange(self.position, self.position + n, device=device)[None]
        if self.position == 0 and self.model.config._attn_implementation in ("sdpa", "flash_attention_2"):
            # From an empty context the window is exactly the new rows and the mask is plain
            # causal: pass none, so attention can take its fused causal (flash) kernel.
            self.window.apply(n)
            mask = None
        else:
            window = self.window.window_for(self.position + n)
            self.window.apply(window)
            mask = causal_mask(pos, window, self.model.config._attn_implementation, self.model.dtype)
        out = self.model.model(inputs_embeds=embeds[None].to(device=device, dtype=self.model.dtype),
                               cache=self.cache, use_cache=True, position_ids=pos,
                               attention_mask=MaskMap(mask))
        self.position += n
        return out.last_hidden_state[0]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.family.logits(self.model, hidden)

    @torch.no_grad()
    def next_token(self, hidden_last: torch.Tensor) -> int:
        """Greedy next token after ``hidden_last``; a graph replay already computed it."""
        if self._graph_last is not None and hidden_last.data_ptr() == self._graph_last[0][-1].data_ptr():
            return int(self._graph_last[1])
        return int(self.logits(hidden_last).argmax())


def _device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:sm{major}{minor}"
    return device.type


def _derive_layout(cache: Any, dtype: torch.dtype, family: Any):
    specs: list[BufferSpec] = []
    flags: list[_Flag] = []
    attn: list[Any] = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticSlidingWindowLayer):
            raise ModelLoadError(f"layer {i}: sliding-window attention cache is not supported yet")
        if isinstance(layer, StaticLayer):
            if not layer.is_initialized:
                raise ModelLoadError(f"layer {i}: attention cache was not materialised")
            for part, t in (("k", layer.keys), ("v", layer.values)):
                _check_dtype(f"L{i}.{part}", t, dtype)
                specs.append(BufferSpec(f"L{i}.{part}", Kind.KV, t.dtype, tuple(t.shape), seq_axis=2))
            attn.append(layer)
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for j in range(layer.number_of_states):
                if layer.is_conv_states_initialized[j]:
                    t = layer.conv_states[j]
                    _check_dtype(f"L{i}.conv{j}", t, *family.conv_dtypes(dtype))
                    specs.append(BufferSpec(f"L{i}.conv{j}", Kind.CONV, t.dtype, tuple(t.shape)))
                if layer.is_recurrent_states_initialized[j]:
                    t = layer.recurrent_states[j]
                    _check_dtype(f"L{i}.rec{j}", t, *family.recurrent_dtypes(dtype))
                    specs.append(BufferSpec(f"L{i}.rec{j}", Kind.RECURRENT, t.dtype, tuple(t.shape)))
                flags.append(_Flag(i, j))
    return specs, flags, attn


def _check_dtype(name: str, t: torch.Tensor, *allowed: torch.dtype) -> None:
    if t.dtype not in allowed:
        raise ModelLoadError(f"cache buffer {name} materialised as {t.dtype}, expected "
                             + " or ".join(str(d) for d in allowed))


def _point_cache_at(cache: Any, live: LiveState) -> None:
    """Make the cache read and write the live buffers (same addresses from now on)."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticLayer):
            layer.keys = live.view(f"L{i}.k")
            layer.values = live.view(f"L{i}.v")
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for j in range(layer.number_of_states):
                if f"L{i}.conv{j}" in live.views:
                    layer.conv_states[j] = live.view(f"L{i}.conv{j}")
                if f"L{i}.rec{j}" in live.views:
                    layer.recurrent_states[j] = live.view(f"L{i}.rec{j}")
