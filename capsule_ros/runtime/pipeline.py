"""From messages to answers: the query path shared by the ROS node and offline runs.

``Pipeline.on_message`` takes one message of one input. It encodes (and so validates) it first;
a bad message yields a ``Failure`` and changes nothing. A context input's embedding is kept as
that stream's pending context; a trigger runs a query on every stream it triggers: restore,
append (pending context, then the trigger), act, publish (the caller's callback), commit.

Both head kinds go through that one path and one ``Answer``: a continuous head's ``output`` is an
``ActionOutput`` (chunk + step period), a token head's a ``TextOutput`` (ids, text, why it
stopped). A token head decodes inside the query, before publish and commit (see ``_TokenAct``).

The node and ``capsule_ros.demo``'s offline run call exactly this, so a bag replayed through ROS
and the same messages fed offline give the same actions.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..capsule import CapsuleError
from ..capsule.files import clean_stale_temps, list_capsules, load_capsule, save_capsule
from ..capsule.persist import Persister
from ..capsule.places import CapsuleDirs, OwnerLock
from ..capsule.tiers import TierFiles
from ..config import ConfigError, NodeConfig, resolve
from ..models import HybridModel, ModelSpec
from ..policy.encoders import build_encoder
from ..policy.heads import ContinuousActionHead, TokenSampler, build_head
from ..policy.weights import load_policy_weights, policy_weights_path
from ..status_codes import CapsuleRosError, Code, capsule_code
from .engine import Engine, QueryResult
from .tier_policy import TierConfig
from .figures import Figures

log = logging.getLogger("capsule_ros")


@dataclass(frozen=True)
class ActionOutput:
    """A continuous head's chunk: ``values`` ``[horizon, dof]``, one row every ``step_period`` s."""

    values: np.ndarray
    step_period: float
    columns: tuple[str, ...] = ()  # the name of each column (joint or axis)
    kind = "continuous"


@dataclass(frozen=True)
class TextOutput:
    """A token head's continuation: the ids sampled after the query, and their text."""

    token_ids: tuple[int, ...]
    text: str
    stop: str                    # "eos" | "max_new_tokens" | "context" (no room left)
    kind = "tokens"


@dataclass
class Answer:
    """One answered query, whatever the stream's head: ``output`` is an ActionOutput or a TextOutput."""

    stream: str
    request_id: int
    output: ActionOutput | TextOutput
    position: int                # boundary committed by this query
    stamp_ns: int                # trigger header stamp, or receive time (flagged)
    stamp_is_receive_time: bool
    restore_ms: float
    append_ms: float
    act_ms: float                # head, including every decode step of a token head
    prev_commit_ms: float        # this stream's previous commit (commit runs after publishing)
    events: list[tuple[Code, str]] = field(default_factory=list)

    # continuous-head shorthands (None for a token head)
    @property
    def actions(self) -> np.ndarray | None:
        return self.output.values if isinstance(self.output, ActionOutput) else None

    @property
    def step_period(self) -> float | None:
        return self.output.step_period if isinstance(self.output, ActionOutput) else None


@dataclass
class Failure:
    stream: str
    request_id: int
    code: Code
    text: str


Outcome = Answer | Failure
Publish = Callable[[Outcome], None]


@dataclass
class _StreamState:
    next_request: int = 1
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # context input -> embeds
    last_commit_ms: float = 0.0


Head = ContinuousActionHead | TokenSampler


class TextCodec:
    """Token ids -> text: the checkpoint tokenizer's ``decode`` when there is one, else the mirror
    of the text encoder's byte-level fallback (id - byte_offset as a utf-8 byte; ids outside
    [byte_offset, byte_offset + 256) and end-of-sequence ids are skipped, bad utf-8 is replaced).
    """

    def __init__(self, tokenizer: Any = None, byte_offset: int = 0,
                 eos_ids: frozenset[int] = frozenset()) -> None:
        self.tokenizer, self.byte_offset, self.eos_ids = tokenizer, int(byte_offset), eos_ids

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        raw = bytes(i - self.byte_offset for i in ids
                    if i not in self.eos_ids and 0 <= i - self.byte_offset < 256)
        return raw.decode("utf-8", errors="replace")


class _ContinuousAct:
    """A continuous head: the whole act happens on the query's last hidden state."""

    def __init__(self, head: ContinuousActionHead, columns: tuple[str, ...]) -> None:
        self.head, self.columns = head, columns

    def first(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def finish(self, first: torch.Tensor) -> ActionOutput:
        return ActionOutput(first.detach().cpu().numpy(), self.head.step_period, self.columns)


class _TokenAct:
    """A token head: the first token from the query's last hidden state (inside ``engine.query``),
    then decode (after it, before commit): each sampled token, as the model's own embedding, is
    fed back with ``engine.extend`` until EOS, ``max_new_tokens`` or the context limit. Every
    emitted token is fed back, so the committed boundary holds the whole answer and the next query
    continues after it.

    Randomness: a ``torch.Generator`` whose state lives in ``engine.meta_tensors["rng"]``,
    restored with the stream's capsule at the start of act and committed with the new boundary;
    a stream without one (new, or reset to empty) seeds it from the head's ``seed``. So a restored
    or rolled-back stream samples the same continuation.
    """

    RNG_KEY = "rng"

    def __init__(self, sampler: TokenSampler, engine: Engine, codec: TextCodec) -> None:
        self.sampler, self.engine, self.codec = sampler, engine, codec
        self.model: HybridModel = engine.model
        self.generator: torch.Generator | None = None

    def _restore_generator(self) -> torch.Generator | None:
        if self.sampler.greedy:
            return None
        device = self.model.live.device
        state = self.engine.meta_tensors.get(self.RNG_KEY)
        if state is None:
            return self.sampler.new_generator(device)
        gen = torch.Generator(device=device)
        gen.set_state(state.clone())
        return gen

    def first(self, hidden: torch.Tensor) -> int:
        self.generator = self._restore_generator()
        return self.sampler.pick(self.model.logits(hidden), self.generator)

    def finish(self, token: int) -> TextOutput:
        ids = [token]
        eos = self.model.eos_token_ids
        stop = "max_new_tokens"
        with torch.no_grad():
            while True:
                if self.model.position + 1 > self.model.max_len:
                    stop = "context"
                    break
                hidden = self.engine.extend(self.model.embed_tokens([ids[-1]]), source="decode")
                if ids[-1] in eos:
                    stop = "eos"
                    break
                if len(ids) >= self.sampler.max_new_tokens:
                    break
                ids.append(self.sampler.pick(self.model.logits(hidden[-1]), self.generator))
        if self.generator is not None:
            self.engine.meta_tensors[self.RNG_KEY] = self.generator.get_state()
        return TextOutput(tuple(ids), self.codec.decode(ids), stop)


class Pipeline:
    def __init__(self, config: NodeConfig, engine: Engine, encoders: dict[str, Any],
                 heads: dict[str, Head], policy_weights_loaded: bool,
                 tokenizer: Any = None) -> None:
        self.config = config
        self.engine = engine
        self.encoders = encoders
        self.heads = heads
        self.policy_weights_loaded = policy_weights_loaded
        text = [e for e in encoders.values() if getattr(e, "kind", "") == "text"]
        self.codec = TextCodec(tokenizer, text[0].byte_offset if text else 0,
                               engine.model.eos_token_ids)
        self.streams = {name: _StreamState() for name in config.streams}
        self.persister: Persister | None = None
        self.dirs: CapsuleDirs | None = None       # capsule files, when capsules.directory is set
        self._owner: OwnerLock | None = None
        # Bounded per-stream figures (latency window, rates, errors, context) for diagnostics.
        self.figures = Figures(max_context=engine.model.max_len)
        for name in config.streams:
            engine.add_stream(name)

    @classmethod
    def build(cls, config: NodeConfig, node_name: str = "/capsule_node",
              ros_home: str | None = None) -> "Pipeline":
        """Everything from the config. ``node_name`` (fully qualified) names this node's own
        capsule directories; a relative ``capsules.directory`` resolves against ``ros_home``
        (default: $ROS_HOME, else ~/.ros)."""
        m = config.model
        set_threads(m.threads)
        spec = ModelSpec(config_file=resolve(m.config_file) if not m.path else None,
                         path=m.path or None, seed=m.seed, dtype=m.dtype, device=m.device,
                         max_len=m.max_context)
        model = HybridModel.load(spec)
        if model.live.device.type == "cuda" and m.cuda_graphs:
            model.enable_graphs()  # graph-bound execution: restores copy into captured buffers
        caps = config.capsules
        engine = Engine(model, history_depth=caps.history_depth,
                        chunk_size=m.chunk_size, context_policy=caps.context_policy,
                        rebase_window=caps.rebase_window, verify_every=caps.verify_every)
        hidden = model.hidden_size
        encoders = {name: build_encoder(name, dict(spec.encoder), hidden, m.seed,
                                        token_embedding=model.token_embedding(),
                                        tokenizer=model.tokenizer)
                    for name, spec in config.inputs.items()}
        heads: dict[str, Head] = {}
        for name, s in config.streams.items():
            head_spec = dict(s.head)
            head_spec["head"] = head_spec.pop("kind", "continuous")
            heads[name] = build_head(head_spec, hidden, m.seed, name=f"head.{name}")
        weights_file = m.policy_weights or (str(policy_weights_path(m.path)) if m.path else "")
        modules = {f"encoders.{k}": v for k, v in encoders.items()}
        # token samplers have no weights (they use the model's own LM head)
        modules.update({f"head.{k}": v for k, v in heads.items() if isinstance(v, torch.nn.Module)})
        loaded = load_policy_weights(modules, resolve(weights_file) if weights_file else None)
        for module in modules.values():
            # on the model's device: images are resized and projected there, not on the CPU
            module.to(model.live.device).eval()
        pipeline = cls(config, engine, encoders, heads, loaded, tokenizer=model.tokenizer)
        pipeline.open_files(node_name, ros_home)
        return pipeline

    def open_files(self, node_name: str, ros_home: str | None = None) -> None:
        """Claim this node's capsule directories (refused while another live process owns
        them), set up tier budgets, persistence and reload."""
        caps, layout = self.config.capsules, self.engine.live.layout
        if not caps.directory:
            if caps.persist_on_commit or caps.reload_at_start:
                raise ValueError("capsules.directory is required for persist_on_commit/reload_at_start")
            _configure_tiers(self.engine, caps, None)
            return
        self.dirs = CapsuleDirs.of(caps.directory, node_name, ros_home)
        self._owner = self.dirs.claim()
        clean_stale_temps(self.dirs.saved)
        _configure_tiers(self.engine, caps, TierFiles(self.dirs.tiers, layout))
        if caps.persist_on_commit or caps.reload_at_start:
            self.persister = Persister(self.dirs.streams, layout)
        if caps.reload_at_start:
            self.reload()

    # -- capsule files ---------------------------------------------------------------------
    def reload(self) -> list[str]:
        """Streams start at their persisted boundaries: the configured ones and those this node
        adopted (forked or loaded) and persisted. Refused files are reported, not fatal."""
        names = list(self.streams) + [n for n in list_capsules(self.persister.directory)
                                      if n not in self.streams]
        loaded = self.persister.load_all(self.engine.model.fingerprint, names,
                                         device=self.engine.live.device)
        like = next(iter(self.config.streams))
        for stream, capsule in loaded.items():
            self.engine.install(stream, capsule)
            if stream not in self.streams:
                self._adopt(stream, like=like)
        for name, why in self.persister.refused.items():
            log.warning("persisted capsule %s refused: %s", name, why)
        return sorted(loaded)

    def save(self, stream: str, name: str = "") -> str:
        """Write the stream's boundary to ``saved/`` as ``<name or stream>`` (user snapshots:
        persistence never touches them)."""
        directory = self._saved_dir()
        if self.engine.store.slot(stream).held_current is None:
            raise CapsuleError(f"stream {stream!r} has no boundary to save (empty context)")
        return str(save_capsule(self.engine.boundary(stream), directory, name or stream,
                                self.engine.live.layout))

    def load(self, stream: str, name: str) -> int:
        """Load ``saved/<name>`` (verified) as the stream's boundary; a new stream is queryable
        by ``~/query``. Returns the loaded position. A refused load changes nothing."""
        capsule = load_capsule((self._saved_dir(), name), self.engine.model.fingerprint,
                               self.engine.live.layout, device=self.engine.live.device)
        self.engine.install(stream, capsule)
        if stream not in self.streams:
            self._adopt(stream, like=next(iter(self.config.streams)))
        return capsule.position

    def close(self) -> None:
        """Shutdown: only flush what is queued (persisting runs off the query path), then give
        up the capsule directories."""
        if self.persister is not None:
            self.persister.close()
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def _saved_dir(self) -> str:
        if self.dirs is None:
            raise CapsuleError("capsules.directory is not set: no place for capsule files")
        return str(self.dirs.saved)

    def fork(self, source: str, new_stream: str) -> None:
        """A new stream from ``source``'s boundary, queried through ``~/query`` (no trigger)."""
        self.engine.fork(source, new_stream)
        self._adopt(new_stream, like=source)

    def _adopt(self, stream: str, like: str) -> None:
        """Register a stream that has no trigger input (forked or loaded) with ``like``'s head."""
        spec = self.config.streams[like]
        self.config.streams[stream] = dataclasses.replace(spec, name=stream, trigger="", context=())
        self.heads[stream] = self.heads[like]
        self.streams[stream] = _StreamState()

    # -- configure-time checks and warm-up ---------------------------------------------------
    def check_memory(self) -> None:
        """On a GPU: the device-tier capsule budget must fit in what the model and live state
        left free (they are allocated by now); a budget that cannot fit is a ConfigError."""
        device = self.engine.live.device
        if device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(self.config.capsules.device_budget_mb * 2**20)
        if budget > free:
            used = torch.cuda.memory_allocated(device)
            raise ConfigError(f"capsules.device_budget_mb {self.config.capsules.device_budget_mb:g} "
                              f"MiB does not fit: {free / 2**20:.0f} MiB free on {device} after the "
                              f"model and live state ({used / 2**20:.0f} MiB)")

    def warm_up(self) -> str:
        """Capture and run every graph the configuration can reach (nothing is captured while
        serving: ``captures`` must not move after this), and run each encoder and head once so
        their kernels are loaded too."""
        info = self.engine.model.warm_up(self.engine.chunk_size)
        return (f"{info['execution']} path, {info['variants']} graph variants, "
                f"{info['captures']} captures, warm-up {info['seconds']:.2f} s")

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far; constant after ``warm_up`` while serving."""
        return self.engine.model.captures

    def node_figures(self) -> dict[str, str]:
        """Node-level values for diagnostics: model, device, execution path, GPU memory."""
        model = self.engine.model
        device = self.engine.live.device
        values = {"model": model.model.config.model_type, "device": str(device),
                  "dtype": self.config.model.dtype, "execution": model.execution,
                  "captures": str(self.captures), "streams": str(len(self.streams))}
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            values["gpu_allocated_mb"] = f"{torch.cuda.memory_allocated(device) / 2**20:.0f}"
            values["gpu_free_mb"] = f"{free / 2**20:.0f}"
            values["gpu_total_mb"] = f"{total / 2**20:.0f}"
        return values

    def describe(self) -> str:
        model = self.engine.model
        params = sum(p.numel() for p in model.model.parameters())
        src = model.spec.describe()
        weights = "loaded" if self.policy_weights_loaded else "SEEDED RANDOM (actions mean nothing)"
        return (f"model {model.model.config.model_type} ({params / 1e6:.1f} M params) from {src}; "
                f"context {model.max_len}; encoder/head weights {weights}")

    # -- the query path --------------------------------------------------------------------
    def on_message(self, input_name: str, msg: Any, receive_ns: int, publish: Publish) -> None:
        """Handle one message of ``input_name``; answers and failures go to ``publish``."""
        fed = self.config.streams_fed_by(input_name)
        triggered = [s.name for s, is_trigger in fed if is_trigger]
        try:
            with torch.no_grad():
                embeds = self.encoders[input_name].encode(msg)
        except CapsuleRosError as e:
            for stream in triggered or [s.name for s, _ in fed]:
                self._fail(publish, Failure(stream, self._take_id(stream) if stream in triggered
                                            else 0, e.code, e.text))
            return
        for stream_spec, is_trigger in fed:
            if not is_trigger:
                self.streams[stream_spec.name].pending[input_name] = embeds
        stamp_ns, from_header = _stamp_of(msg, receive_ns)
        for stream in triggered:
            self.figures.stream(stream).record_message(receive_ns, stamp_ns if from_header else None)
            self._run(stream, self._take_id(stream), embeds, input_name, stamp_ns, not from_header,
                      publish)

    def query(self, stream: str, request_id: int, extra: torch.Tensor | None, receive_ns: int,
              publish: Publish) -> None:
        """An explicit query (``~/query``): append pending context (and ``extra``), act."""
        if stream not in self.streams:
            publish(Failure(stream, request_id, Code.UNKNOWN_STREAM, f"unknown stream {stream!r}"))
            return
        request_id = request_id or self._take_id(stream)
        self._run(stream, request_id, extra, "query", receive_ns, True, publish)

    def _take_id(self, stream: str) -> int:
        state = self.streams[stream]
        rid, state.next_request = state.next_request, state.next_request + 1
        return rid

    def _run(self, stream: str, request_id: int, trigger: torch.Tensor | None, source: str,
             stamp_ns: int, stamp_is_receive_time: bool, publish: Publish) -> None:
        state = self.streams[stream]
        spec = self.config.streams[stream]
        parts = [state.pending[c] for c in spec.context if c in state.pending]
        if trigger is not None:
            parts.append(trigger)
        if not parts:
            self._fail(publish, Failure(stream, request_id, Code.NO_OBSERVATION, "nothing to append"))
            return
        embeds = torch.cat(parts)
        act = self._act_for(stream)
        try:
            result: QueryResult = self.engine.query(stream, embeds, act=act.first, source=source)
            t0 = time.perf_counter()
            output = act.finish(result.output)
            decode_ms = (time.perf_counter() - t0) * 1e3
        except (CapsuleRosError, CapsuleError) as e:
            self.engine.abort()  # the stream keeps its previous boundary
            self._fail(publish, failure_from(stream, request_id, e))
            return
        state.pending.clear()  # the context went into this boundary
        answer = Answer(stream, request_id, output, self.engine.model.position, stamp_ns,
                        stamp_is_receive_time, result.restore_ms, result.append_ms,
                        result.act_ms + decode_ms, state.last_commit_ms, result.events)
        for code, text in result.events:
            publish(Failure(stream, request_id, code, text))
        publish(answer)
        try:
            state.last_commit_ms = self.engine.commit()
        except CapsuleError as e:  # e.g. over every tier budget: the previous boundary stays
            self.engine.abort()
            self._fail(publish, failure_from(stream, request_id, e))
            return
        if self.persister is not None:
            self.persister.submit(stream, self.engine.boundary(stream))
        self.figures.stream(stream).record_answer(answer.restore_ms, answer.append_ms,
                                                  answer.act_ms, state.last_commit_ms,
                                                  self.engine.store.position(stream))

    def _fail(self, publish: Publish, failure: Failure) -> None:
        self.figures.stream(failure.stream).record_error()
        publish(failure)

    def _act_for(self, stream: str) -> _ContinuousAct | _TokenAct:
        head = self.heads[stream]
        if isinstance(head, TokenSampler):
            return _TokenAct(head, self.engine, self.codec)
        columns = self.config.streams[stream].head.get("columns") or [f"a{i}" for i in range(head.dof)]
        return _ContinuousAct(head, tuple(columns))


def set_threads(threads: int) -> int:
    """torch's intra-op threads: ``threads``, or (0) every core but one, which is left to the ROS
    executor and the I/O threads (on 2 cores the default of 2 competed with the executor)."""
    n = threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    return n


def failure_from(stream: str, request_id: int, e: Exception) -> Failure:
    """A coded failure from an engine or store error (store errors carry their own code)."""
    if isinstance(e, CapsuleRosError):
        return Failure(stream, request_id, e.code, e.text)
    return Failure(stream, request_id, capsule_code(getattr(e, "reason", "refused")), str(e))


def _configure_tiers(engine: Engine, caps: Any, files: TierFiles | None) -> None:
    """Byte budgets per tier, when any is set (0 = unlimited); the file tier is the node's own
    tier directory."""
    mb = lambda v: int(v * 2**20) if v else None  # noqa: E731
    if not (caps.device_budget_mb or caps.host_budget_mb or caps.file_budget_mb):
        return
    engine.configure_tiers(TierConfig(device_bytes=mb(caps.device_budget_mb),
                                      host_bytes=mb(caps.host_budget_mb),
                                      file_bytes=mb(caps.file_budget_mb)), files)


def _stamp_of(msg: Any, receive_ns: int) -> tuple[int, bool]:
    """(stamp in ns, taken from a header?) for a message."""
    header = getattr(msg, "header", None)
    if header is None:
        return receive_ns, False
    stamp = header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec), True
