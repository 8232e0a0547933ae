"""The query path, top to bottom, shared by the ROS node and offline runs.

Handing on (``on_message``, ``query``): a message is encoded at once (encoding validates it: a
bad message is one ``Failure`` and changes nothing), kept as context of its input, and, for each
stream it triggers, queued as a ``Job`` (``worker.Scheduler``: per-stream policies, fairness,
exact accounting). The worker then runs ``answer`` for each job, which reads top to bottom:

    context paired by time -> tensors -> restore -> append -> act -> commit -> outcome

and returns what to publish. A published boundary is always a committed one: the answer is made
after the commit, and a refused commit publishes a status instead. Any exception aborts the
query (the stream keeps its previous boundary) and becomes an ``INTERNAL`` status (the
scheduler's error boundary).

The node runs the worker in a thread (``start``); offline runs drain it in the caller, so a bag
replayed through ROS and the same messages fed offline take the same path and pair the same
context.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..capsule import CapsuleError
from ..capsule.files import list_capsules, load_capsule, save_capsule
from ..capsule.persist import Persister
from ..capsule.places import CapsuleDirs, OwnerLock
from ..capsule.tiers import TierFiles
from ..config import ConfigError, NodeConfig, StreamSpec
from ..status_codes import CapsuleRosError, Code, capsule_code
from .context import ContextCache
from .decode import Head, TextCodec, act_for
from .engine import Engine, QueryResult
from .engine import stats as engine_stats
from .figures import Figures
from .outcome import Answer, Failure, Outcome, Publish
from .tier_policy import TierConfig
from .worker import Job, Scheduler, StreamPolicy

log = logging.getLogger("capsule_ros")

CONTEXT_DEPTH = 32   # messages kept per context input (covers the pairing wait at sensor rates)
TRIGGER_DEPTH = 2    # per trigger-only input (for ~/query's ``input``)


@dataclass
class _StreamState:
    next_request: int = 1
    last_context: dict[str, int] = field(default_factory=dict)  # input -> message appended last


class Deferred:
    """A trigger message whose form was checked on arrival (``Encoder.check``), encoded once,
    on the worker, when first needed; the raw message is let go then."""

    __slots__ = ("encoder", "message", "_embeds")

    def __init__(self, encoder: Any, message: Any) -> None:
        self.encoder, self.message, self._embeds = encoder, message, None

    def embeds(self) -> torch.Tensor:
        if self._embeds is None:
            with torch.no_grad():
                self._embeds = self.encoder.encode(self.message)
            self.message = None
        return self._embeds


def _resolve(embeds: Any) -> torch.Tensor:
    return embeds.embeds() if isinstance(embeds, Deferred) else embeds


class Pipeline:
    def __init__(self, config: NodeConfig, engine: Engine, encoders: dict[str, Any],
                 heads: dict[str, Head], policy_weights_loaded: bool,
                 tokenizer: Any = None) -> None:
        self.config = config
        self.engine = engine
        self.encoders = encoders
        self.heads: dict[str, Head] = {}
        self.policy_weights_loaded = policy_weights_loaded
        text = [e for e in encoders.values() if getattr(e, "kind", "") == "text"]
        self.text_encoder = text[0] if text else None
        self.codec = TextCodec(tokenizer, text[0].byte_offset if text else 0,
                               engine.model.eos_token_ids)
        self.persister: Persister | None = None
        self.dirs: CapsuleDirs | None = None       # capsule files, when capsules.directory is set
        self.owner: OwnerLock | None = None
        # Bounded per-stream figures (latency window, rates, errors, context) for diagnostics.
        self.figures = Figures(max_context=engine.model.max_len)
        context_inputs = {c for s in config.streams.values() for c in s.context}
        self.context = ContextCache({name: CONTEXT_DEPTH if name in context_inputs else TRIGGER_DEPTH
                                     for name in config.inputs})
        self._sink: Publish = lambda outcome: None
        self.scheduler = Scheduler(self.answer, self._emit, now_ns=lambda: 0, ready=self.ready,
                                   context_wait_s=config.queries.context_wait_ms / 1e3,
                                   idle=self.idle_step)
        # the one stream registry: configured, forked, loaded and dropped streams all go through it
        self.streams: dict[str, _StreamState] = {}
        for name in list(config.streams):
            self._register(config.streams[name], heads[name])

    def _register(self, spec: StreamSpec, head: Head) -> None:
        self.config.streams[spec.name] = spec
        self._index_triggers()
        self.heads[spec.name] = head
        self.streams[spec.name] = _StreamState()
        if spec.name not in self.engine.store:
            self.engine.add_stream(spec.name)
        self.scheduler.add_stream(spec.name, StreamPolicy(spec.queue, spec.queue_depth,
                                                          spec.max_age_ms))
        self.figures.stream(spec.name)

    def triggered_by(self, input_name: str) -> tuple[str, ...]:
        return self._triggers.get(input_name, ())

    def _index_triggers(self) -> None:
        # rebuilt whole and swapped in: callbacks on executor threads read it while the worker
        # registers or drops a stream
        index: dict[str, tuple[str, ...]] = {}
        context: set[str] = set()
        for s in list(self.config.streams.values()):
            if s.trigger:
                index[s.trigger] = index.get(s.trigger, ()) + (s.name,)
            context.update(s.context)
        self._triggers, self._context_inputs = index, frozenset(context)

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
        persistence never touches them). The boundary is taken on the worker, in the stream's
        order; the file is written here, off the query path (a capsule never changes)."""
        directory = self._saved_dir()
        capsule = self.call(lambda: self._boundary_to_save(stream))
        return str(save_capsule(capsule, directory, name or stream, self.engine.live.layout))

    def _boundary_to_save(self, stream: str) -> Any:
        if stream not in self.engine.store:
            raise CapsuleRosError(Code.UNKNOWN_STREAM, f"unknown stream {_short(stream)}")
        if self.engine.store.slot(stream).held_current is None:
            raise CapsuleError(f"stream {stream!r} has no boundary to save (empty context)")
        return self.engine.boundary(stream)

    def load(self, stream: str, name: str) -> int:
        """Load ``saved/<name>`` (verified here, off the query path) as the stream's boundary,
        on the worker in the stream's order; a new stream is queryable by ``~/query``. Returns
        the loaded position. A refused load changes nothing."""
        capsule = load_capsule((self._saved_dir(), name), self.engine.model.fingerprint,
                               self.engine.live.layout, device=self.engine.live.device)

        def install() -> int:
            self.engine.install(stream, capsule)
            if stream not in self.streams:
                self._adopt(stream, like=next(iter(self.config.streams)))
            self._context_changed(stream)
            return capsule.position
        return self.call(install)

    # -- capsule verbs: on the worker, between queries, in the stream's order ---------------
    def rollback(self, stream: str, k: int = 1) -> int:
        def op() -> int:
            self._known(stream)
            self.engine.rollback(stream, k)
            return self._context_changed(stream)
        return self.call(op)

    def reset(self, stream: str) -> int:
        def op() -> int:
            self._known(stream)
            self.engine.reset(stream)
            return self._context_changed(stream)
        return self.call(op)

    def pin(self, stream: str, pinned: bool) -> None:
        def op() -> None:
            self._known(stream)
            self.engine.store.pin(stream, pinned)
        self.call(op)

    def stats(self) -> dict[str, Any]:
        """The engine's figures and the worker's accounting (received = answered + superseded
        + overflowed + stale + rejected + failed + pending, per stream)."""
        out = self.call(lambda: engine_stats(self.engine))
        out["accounting"] = self.scheduler.accounting()
        return out

    def set_budgets(self, device_mb: float, host_mb: float, file_mb: float) -> None:
        """New tier budgets while serving (MiB, 0 = unlimited), applied on the worker between
        queries: what is held is brought within them, or they are refused (``CapsuleError``)
        and the old ones stay."""
        mb = lambda v: int(v * 2**20) if v else None  # noqa: E731
        config = TierConfig(mb(device_mb), mb(host_mb), mb(file_mb))
        files = self.engine.store.files
        if files is None and self.dirs is not None:
            files = TierFiles(self.dirs.tiers, self.engine.live.layout, self.scheduler.gate)
        if file_mb and files is None:
            raise CapsuleError("capsules.file_budget_mb needs capsules.directory (set at configure)")

        def apply() -> None:
            old = (self.engine.tiers, self.engine.store.files)
            try:
                self.engine.configure_tiers(config, files)
            except Exception:
                self.engine.tiers, self.engine.store.files = old
                raise
        self.call(apply)

    def list_streams(self) -> list[str]:
        return self.call(self.engine.store.list)

    def positions(self) -> dict[str, int]:
        return self.call(lambda: {name: self.engine.store.position(name)
                                  for name in self.engine.store.list()})

    def _known(self, stream: str) -> None:
        if stream not in self.engine.store:
            raise CapsuleRosError(Code.UNKNOWN_STREAM, f"unknown stream {_short(stream)}; "
                                  f"streams: {sorted(self.streams)}")

    def _context_changed(self, stream: str) -> int:
        """After a rollback, reset or load: the stream's position, also in its figures; context
        already appended is appended again if it pairs with the next trigger."""
        position = self.engine.store.position(stream)
        self.figures.stream(stream).set_context(position)
        self.streams[stream].last_context.clear()
        return position

    def close(self) -> None:
        """Shutdown: stop the worker after the query in hand, flush queued capsule writes
        (persisting runs off the query path), then give up the capsule directories."""
        self.stop()
        if self.persister is not None:
            self.persister.close()
        if self.engine.store.files is not None:
            self.engine.store.files.close()
        if self.owner is not None:
            self.owner.release()
            self.owner = None

    def _saved_dir(self) -> str:
        if self.dirs is None:
            raise CapsuleError("capsules.directory is not set: no place for capsule files")
        return str(self.dirs.saved)

    def fork(self, source: str, new_stream: str) -> None:
        """A new stream from ``source``'s boundary, queried through ``~/query`` (no trigger)."""
        def op() -> None:
            self._known(source)
            if new_stream in self.engine.store:
                raise CapsuleError(f"stream {new_stream!r} exists already")
            self.engine.fork(source, new_stream)
            self._adopt(new_stream, like=source)
        self.call(op)

    def _adopt(self, stream: str, like: str) -> None:
        """Register a stream that has no trigger input (forked or loaded) with ``like``'s head."""
        spec = self.config.streams[like]
        self._register(dataclasses.replace(spec, name=stream, trigger="", context=()),
                       self.heads[like])

    def drop(self, stream: str) -> None:
        """Forget a forked or loaded stream everywhere: store, queue, head, figures."""
        def op() -> None:
            self._known(stream)
            spec = self.config.streams.get(stream)
            if spec is not None and spec.trigger:
                raise CapsuleError(f"{stream!r} is a configured stream; reset it instead")
            self.engine.drop(stream)
            self.scheduler.drop_stream(stream)
            self.figures.drop(stream)
            for registry in (self.config.streams, self.heads, self.streams):
                registry.pop(stream, None)
            self._index_triggers()
        self.call(op)

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
        counters = self.engine.counters  # written by the worker; plain ints read as they are
        values.update({k: str(counters[k]) for k in ("verifies", "verify_mismatches",
                                                      "verify_errors", "idle_compactions")})
        values["verifications_due"] = str(self.engine.verifications_due)
        if self.persister is not None:
            values.update({f"persist_{k}": str(v) for k, v in self.persister.stats().items()
                           if isinstance(v, (int, float))})
        # how long background writers held off for queries (capsule.quiet)
        values.update({f"writers_{k}": f"{v:.0f}" if isinstance(v, float) else str(v)
                       for k, v in self.scheduler.gate.stats().items()})
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

    # -- serving ---------------------------------------------------------------------------
    def start(self, publish: Publish, now_ns: Callable[[], int]) -> None:
        """Serve in a worker thread: outcomes go to ``publish`` (from that thread)."""
        self._sink = publish
        self.scheduler._now_ns = now_ns
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker between queries (capsule verbs keep the stream's order)."""
        return self.scheduler.call(fn)

    def _emit(self, outcome: Outcome) -> None:
        self._sink(outcome)

    def _offline(self, publish: Publish | None) -> None:
        """Without a worker thread, the caller runs what it queued (same order, same path)."""
        if publish is not None:
            self._sink = publish
            self.scheduler.drain()

    # -- handing on ------------------------------------------------------------------------
    def on_message(self, input_name: str, msg: Any, receive_ns: int,
                   publish: Publish | None = None) -> None:
        """One message of ``input_name``: encode it, keep it as context, queue a job for every
        stream it triggers. With ``publish`` (offline) the jobs run before this returns."""
        if publish is not None:
            self._sink = publish
        stamp_ns, from_header = _stamp_of(msg, receive_ns)
        triggered = self.triggered_by(input_name)
        encoder = self.encoders[input_name]
        t0 = time.perf_counter()
        try:
            # A trigger-only input whose form checks out is encoded by the worker when its job
            # is taken: under load a superseded frame is never encoded, and the executor takes
            # every message off the DDS queue instead of encoding (measured: bench/README.md).
            if input_name not in self._context_inputs and encoder.check(msg):
                embeds: Any = Deferred(encoder, msg)
            else:
                with torch.no_grad():
                    embeds = encoder.encode(msg)
        except Exception as e:  # one status per bad message, whatever it feeds
            coded = isinstance(e, CapsuleRosError)
            if not coded:  # an encoder bug, not a bad message: the node keeps serving
                log.error("encoding %s failed:\n%s", input_name, traceback.format_exc())
            for stream in triggered:
                self.scheduler.refuse(stream, "rejected" if coded else "failed")
                self.figures.stream(stream).record_error()
            self._emit(Failure(triggered[0] if len(triggered) == 1 else "", 0,
                               e.code if coded else Code.INTERNAL,
                               e.text if coded else f"{input_name}: {type(e).__name__}: {e}"[:500],
                               stamp_ns, input_name))
            return
        encode_ms = (time.perf_counter() - t0) * 1e3
        self.context.add(input_name, stamp_ns, embeds)
        for stream in triggered:
            self.figures.stream(stream).record_message(receive_ns, stamp_ns if from_header else None)
            self.scheduler.submit(Job(stream, stamp_ns, not from_header, input_name, embeds,
                                      encode_ms))
            self.engine.prefetch(stream)  # a boundary in the file tier is read while it waits
        if not triggered:
            self.scheduler.wake()  # a job may have been waiting for this context
        self._offline(publish)

    def query(self, stream: str, request_id: int = 0, instruction: str = "", input_name: str = "",
              stamp_ns: int = 0, receive_ns: int = 0, publish: Publish | None = None) -> None:
        """An explicit query (``~/query``): the stream's context paired at ``stamp_ns`` (0: the
        receive time), then the newest message of ``input_name`` and the ``instruction``."""
        if publish is not None:
            self._sink = publish
        if not self.scheduler.has_stream(stream):
            self._emit(Failure(stream, request_id, Code.UNKNOWN_STREAM, f"unknown stream "
                               f"{_short(stream)}; streams: {sorted(self.streams)}",
                               stamp_ns or receive_ns))
            return
        self.scheduler.submit(Job(stream, stamp_ns or receive_ns, stamp_ns == 0, input_name,
                                  request_id=request_id, instruction=instruction, explicit=True))
        self._offline(publish)

    # -- the worker's side -----------------------------------------------------------------
    def ready(self, job: Job) -> bool:
        """Can the job's context be paired for good (see ``context.ContextCache.settled``)?"""
        return all(self.context.settled(c, job.stamp_ns)
                   for c in self.config.streams[job.stream].context)

    def answer(self, job: Job, seq: int, dropped: int) -> list[Outcome]:
        """The query path for one job, top to bottom; returns what to publish."""
        stream = job.stream
        state, spec = self.streams[stream], self.config.streams[stream]

        # context paired by time, then what the query names, then the trigger: tensors
        t0 = time.perf_counter()
        parts, paired = [], {}
        for c in spec.context:
            item = self.context.at_or_before(c, job.stamp_ns)
            if item is not None and item.number != state.last_context.get(c):
                parts.append(item.embeds)
                paired[c] = item.number
        try:
            parts = [_resolve(p) for p in parts]
            parts += self._query_parts(job, paired)
            if job.embeds is not None:
                parts.append(_resolve(job.embeds))   # a deferred trigger is encoded here
        except CapsuleRosError as e:
            return self._failed(Failure(stream, job.request_id, e.code, e.text, job.stamp_ns,
                                        job.input))
        if not parts:
            return self._failed(Failure(stream, job.request_id, Code.NO_OBSERVATION,
                                        "nothing to append: no new context and no observation "
                                        "(name an input or give an instruction)", job.stamp_ns))
        request_id = job.request_id or self._take_id(stream)
        encode_ms = job.encode_ms + (time.perf_counter() - t0) * 1e3

        # restore -> append -> act -> commit
        columns = tuple(spec.head.get("columns") or (f"a{i}" for i in range(spec.head.get("dof", 0))))
        act = act_for(self.heads[stream], self.engine, self.codec, columns)
        try:
            result: QueryResult = self.engine.query(stream, torch.cat(parts), act=act.first,
                                                    source=job.input or "query")
            t1 = time.perf_counter()
            output = act.finish(result.output)
            decode_ms = (time.perf_counter() - t1) * 1e3
            commit_ms = self.engine.commit()
        except (CapsuleRosError, CapsuleError) as e:  # the stream keeps its previous boundary
            self.engine.abort()
            return self._failed(failure_from(stream, request_id, e, job.stamp_ns))
        except BaseException:
            self.engine.abort()  # and the scheduler's error boundary reports it
            raise
        state.last_context.update(paired)  # that context is in the committed boundary now

        # outcome (the boundary is committed: persistence may write it off the query path)
        if self.persister is not None:
            self.persister.submit(stream, self.engine.last_committed)
        position = self.engine.model.position
        answer = Answer(stream, request_id, output, position, job.stamp_ns,
                        job.stamp_is_receive_time, encode_ms, result.restore_ms,
                        result.append_ms, result.act_ms + decode_ms, commit_ms,
                        fetch_ms=result.fetch_ms, seq=seq, dropped=dropped, events=result.events)
        self.figures.stream(stream).record_answer(answer.restore_ms, answer.append_ms,
                                                  answer.act_ms, commit_ms, position)
        events = [Failure(stream, request_id, code, text, job.stamp_ns) for code, text in result.events]
        return events + [answer]

    def idle_step(self) -> list[Outcome] | None:
        """One slice of the engine's background work (between queries): a verification chunk
        or a compaction. A verification that found a divergence is a status on its stream."""
        done = self.engine.idle_step()
        if done is None:
            return None
        kind, report = done
        if kind == "verify" and report is not None and not report.ok:
            return [Failure(report.stream, 0, Code.VERIFY_MISMATCH, report.text()[:500])]
        return []

    def _query_parts(self, job: Job, paired: dict[str, int]) -> list[torch.Tensor]:
        """What an explicit query adds: the newest message of its input, then its instruction."""
        parts = []
        if job.input and job.explicit:
            if job.input not in self.encoders:
                raise CapsuleRosError(Code.BAD_INPUT, f"unknown input {_short(job.input)}; "
                                      f"inputs: {sorted(self.encoders)}")
            item = self.context.at_or_before(job.input, job.stamp_ns)
            if item is None:
                raise CapsuleRosError(Code.NO_OBSERVATION, f"input {job.input!r} has no message "
                                      f"stamped at or before the query")
            if job.input not in paired:
                parts.append(_resolve(item.embeds))
        if job.instruction:
            if self.text_encoder is None:
                raise CapsuleRosError(Code.BAD_INPUT, "no text input is configured for instructions")
            with torch.no_grad():
                parts.append(self.text_encoder.encode(SimpleNamespace(data=job.instruction)))
        return parts

    def _failed(self, failure: Failure) -> list[Outcome]:
        self.figures.stream(failure.stream).record_error()
        return [failure]

    def _take_id(self, stream: str) -> int:
        state = self.streams[stream]
        rid, state.next_request = state.next_request, state.next_request + 1
        return rid


def failure_from(stream: str, request_id: int, e: Exception, stamp_ns: int = 0) -> Failure:
    """A coded failure from an engine or store error (store errors carry their own code)."""
    if isinstance(e, CapsuleRosError):
        return Failure(stream, request_id, e.code, e.text, stamp_ns)
    return Failure(stream, request_id, capsule_code(getattr(e, "reason", "refused")), str(e),
                   stamp_ns)


def _short(name: str, limit: int = 64) -> str:
    """A client-given name in a message: quoted, and cut (a 5,000-character name is a mistake)."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _stamp_of(msg: Any, receive_ns: int) -> tuple[int, bool]:
    """(stamp in ns, taken from a header?) for a message."""
    header = getattr(msg, "header", None)
    if header is None:
        return receive_ns, False
    stamp = header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec), True
