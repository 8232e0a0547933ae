"""From messages to answers: the query path shared by the ROS node and offline runs.

``Pipeline.on_message`` takes one message of one input. It encodes (and so validates) it first;
a bad message yields a ``Failure`` and changes nothing. A context input's embedding is kept as
that stream's pending context; a trigger runs a query on every stream it triggers: restore,
append (pending context, then the trigger), act, publish (the caller's callback), commit.

The node and ``capsule_ros.demo``'s offline run call exactly this, so a bag replayed through ROS
and the same messages fed offline give the same actions.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import NodeConfig, resolve
from ..models import HybridModel, ModelSpec
from ..policy.encoders import build_encoder
from ..policy.heads import ContinuousActionHead, build_head
from ..policy.weights import load_policy_weights, policy_weights_path
from ..status_codes import CapsuleRosError, Code
from .engine import Engine, QueryResult

log = logging.getLogger("capsule_ros")


@dataclass
class Answer:
    stream: str
    request_id: int
    actions: np.ndarray          # [horizon, dof]
    step_period: float
    position: int                # boundary committed by this query
    stamp_ns: int                # trigger header stamp, or receive time (flagged)
    stamp_is_receive_time: bool
    restore_ms: float
    append_ms: float
    act_ms: float
    prev_commit_ms: float        # this stream's previous commit (commit runs after publishing)
    events: list[tuple[Code, str]] = field(default_factory=list)


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


class Pipeline:
    def __init__(self, config: NodeConfig, engine: Engine, encoders: dict[str, Any],
                 heads: dict[str, ContinuousActionHead], policy_weights_loaded: bool) -> None:
        self.config = config
        self.engine = engine
        self.encoders = encoders
        self.heads = heads
        self.policy_weights_loaded = policy_weights_loaded
        self.streams = {name: _StreamState() for name in config.streams}
        # Latencies per stream, for summaries and diagnostics: name -> list of dicts.
        self.latencies: dict[str, list[dict[str, float]]] = {name: [] for name in config.streams}
        for name in config.streams:
            engine.add_stream(name)

    @classmethod
    def build(cls, config: NodeConfig) -> "Pipeline":
        m = config.model
        spec = ModelSpec(config_file=resolve(m.config_file) if not m.path else None,
                         path=m.path or None, seed=m.seed, dtype=m.dtype, device=m.device,
                         max_len=m.max_context)
        model = HybridModel.load(spec)
        engine = Engine(model, history_depth=config.capsules.history_depth,
                        chunk_size=m.chunk_size, context_policy=config.capsules.context_policy,
                        rebase_window=config.capsules.rebase_window)
        hidden = model.hidden_size
        encoders = {name: build_encoder(name, dict(spec.encoder), hidden, m.seed,
                                        token_embedding=model.token_embedding())
                    for name, spec in config.inputs.items()}
        heads = {}
        for name, s in config.streams.items():
            head_spec = dict(s.head)
            head_spec["head"] = head_spec.pop("kind", "continuous")
            if head_spec["head"] != "continuous":
                raise ValueError(f"streams.{name}.head: only 'continuous' heads are wired to the node")
            heads[name] = build_head(head_spec, hidden, m.seed, name=f"head.{name}")
        weights_file = m.policy_weights or (str(policy_weights_path(m.path)) if m.path else "")
        modules = {f"encoders.{k}": v for k, v in encoders.items()}
        modules.update({f"head.{k}": v for k, v in heads.items()})
        loaded = load_policy_weights(modules, resolve(weights_file) if weights_file else None)
        for module in modules.values():
            module.eval()
        return cls(config, engine, encoders, heads, loaded)

    def fork(self, source: str, new_stream: str) -> None:
        """A new stream from ``source``'s boundary, queried through ``~/query`` (no trigger)."""
        self.engine.fork(source, new_stream)
        spec = self.config.streams[source]
        self.config.streams[new_stream] = dataclasses.replace(spec, name=new_stream, trigger="",
                                                               context=())
        self.heads[new_stream] = self.heads[source]
        self.streams[new_stream] = _StreamState()
        self.latencies[new_stream] = []

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
                publish(Failure(stream, self._take_id(stream) if stream in triggered else 0,
                                e.code, e.text))
            return
        for stream_spec, is_trigger in fed:
            if not is_trigger:
                self.streams[stream_spec.name].pending[input_name] = embeds
        stamp_ns, from_header = _stamp_of(msg, receive_ns)
        for stream in triggered:
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
            publish(Failure(stream, request_id, Code.NO_OBSERVATION, "nothing to append"))
            return
        embeds = torch.cat(parts)
        head = self.heads[stream]
        try:
            result: QueryResult = self.engine.query(stream, embeds, act=head, source=source)
        except CapsuleRosError as e:
            self.engine.abort()
            publish(Failure(stream, request_id, e.code, e.text))
            return
        state.pending.clear()  # the context went into this boundary
        answer = Answer(stream, request_id, result.output.detach().cpu().numpy(),
                        head.step_period, result.position, stamp_ns, stamp_is_receive_time,
                        result.restore_ms, result.append_ms, result.act_ms, state.last_commit_ms,
                        result.events)
        for code, text in result.events:
            publish(Failure(stream, request_id, code, text))
        publish(answer)
        state.last_commit_ms = self.engine.commit()
        self.latencies[stream].append({"restore_ms": result.restore_ms, "append_ms": result.append_ms,
                                       "act_ms": result.act_ms, "commit_ms": state.last_commit_ms})


def _stamp_of(msg: Any, receive_ns: int) -> tuple[int, bool]:
    """(stamp in ns, taken from a header?) for a message."""
    header = getattr(msg, "header", None)
    if header is None:
        return receive_ns, False
    stamp = header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec), True
