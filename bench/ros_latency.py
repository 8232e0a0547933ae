#!/usr/bin/env python3
"""End-to-end latency of capsule_node through real ROS 2: publisher -> node -> action subscriber.

Three kinds of process, as a robot stack runs them, in one ROS domain of their own (localhost
discovery), each child in its own session and killed as a group at the end:

* the node: the installed ``capsule_node`` executable with a params file written here (one
  torch thread, ``model.threads: 1``), streams ``cam0..cam3`` (640x480 rgb8 ``sensor_msgs/Image``
  triggers) and ``js0..js3`` (``sensor_msgs/JointState`` triggers), no context inputs, default
  queues (``latest``, no ``max_age``), default model and capsule policy; inputs subscribed
  reliable keep-last 5 (``--input-qos sensor_data`` for the best-effort profile);
* a publisher per row (``--role pub``): publishes on 1 or 4 trigger topics at a fixed rate, each
  message stamped (``header.stamp``) with the system clock just before its own publish; the 4
  streams are published together in each period (synchronised cameras), reliable writer;
* an action subscriber per row (``--role sub``): takes the system clock when an ``ActionChunk``
  reaches its callback; e2e = receive time - header.stamp (the node copies the trigger's stamp;
  both processes on this machine, so the clock is shared).

Per row: e2e p50/p99; the node's own query time (restore + append + act + commit, from the
answer); ``encode_ms`` (from the answer); overhead = e2e - (encode + restore + append + act +
commit), p50/p99; for 4 streams also the overhead of the first answer of each period (nothing
queued in front of it) -- the rest of the 4-stream overhead is waiting behind the other streams'
queries on the one worker. Accounting: the node's ``~/capsule stats`` before and after the row
(received, answered, superseded + overflowed + stale = dropped, ...), beside what was sent.

**Transport floor**: the same row against an echo process (``--role echo``) instead of the node:
it subscribes to the same message with the node's input QoS on the same
executor (``SingleThreadedExecutor``, as the node's) and publishes an ``ActionChunk`` (8x7 values,
reliable, depth 100) with the trigger's stamp from the callback; ``floor_in`` is publish -> echo
callback. That is what rclpy + Fast DDS cost for this message with no model at all.

A fresh node, echo and ROS domain serve each message type: after ~16 subscriber processes had
come and gone in one domain, new ones stopped receiving ActionChunks from the node and from the
bare echo alike (Status still arrived) -- a transport effect, not the node's.

The first ``--warmup`` seconds of a row are published (and accounted) but not in the latency
figures. Each row records the machine's load: CPU used by processes other than this bench's
(``others_cores``, from /proc); a row where others used more than ``--busy`` cores is run again
(up to twice) and the figures kept are the quietest run's.

    python bench/ros_latency.py                 # the latency table (a few minutes on 2 cores)
    python bench/ros_latency.py --soak          # 5-minute timed replay, 4 cameras at 15 Hz

Writes ``bench/results/ros_latency.json`` (``--soak``: ``soak_replay_<machine>.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
NS = "/ros_latency"
NODE = f"{NS}/capsule_node"
ECHO_NS = f"{NS}/echo"
WIDTH, HEIGHT = 640, 480
JOINTS = [f"joint_{i}" for i in range(1, 8)]
MAX_STREAMS = 4
#: a child's environment: one OpenMP / torch thread (2 contended threads are much slower on a
#: shared 2-core box), unbuffered logs, localhost discovery
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "RCUTILS_COLORIZED_OUTPUT": "0", "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}


def machine_label() -> str:
    return f"cpu-{os.cpu_count()}c"


def write_results(doc: dict, out: str | Path) -> Path:
    """Write a benchmark's JSON document (creating bench/results/) and say where."""
    sys.path.insert(0, str(ROOT / "bench"))
    from capsule_ops import write_results as write  # the helper the benches share
    return write(doc, out)


# ---------------------------------------------------------------------------------------------
# topics and the node's parameters
# ---------------------------------------------------------------------------------------------

def trigger_topic(kind: str, i: int, target: str = "node") -> str:
    base = NS if target == "node" else ECHO_NS
    return f"{base}/cam{i}" if kind == "image" else f"{base}/joints{i}"


def stream_name(kind: str, i: int) -> str:
    return f"cam{i}" if kind == "image" else f"js{i}"


def node_params(path: Path, queue: str = "latest", queue_depth: int = 8,
                max_age_ms: float = 0.0, input_qos: str = "reliable") -> Path:
    inputs, streams = [], []
    lines = ["/**/capsule_node:", "  ros__parameters:",
             f"    model: {{config_file: {ROOT / 'config/models/default_qwen3_5.json'}, "
             "device: cpu, dtype: float32, threads: 1, max_context: 4096, chunk_size: 64}",
             "    capsules: {history_depth: 8, context_policy: rebase, rebase_window: 8}",
             "    inputs:"]
    body = []
    for i in range(MAX_STREAMS):
        for kind in ("image", "joints"):
            name = f"in_{stream_name(kind, i)}"
            inputs.append(name)
            if kind == "image":
                body.append(f"      {name}: {{topic: {trigger_topic(kind, i)}, type: sensor_msgs/msg/Image, "
                            f"encoder: image, resize: [32, 32], patch: 8, "
                            f"expect_size: [{HEIGHT}, {WIDTH}], qos: {input_qos}, qos_depth: {INPUT_DEPTH}}}")
            else:
                body.append(f"      {name}: {{topic: {trigger_topic(kind, i)}, "
                            f"type: sensor_msgs/msg/JointState, encoder: joint_state, "
                            f"joints: [{', '.join(JOINTS)}], fields: [position, velocity], "
                            f"qos: {input_qos}, qos_depth: {INPUT_DEPTH}}}")
            streams.append(f"      {stream_name(kind, i)}: {{trigger: {name}, "
                           f"head: {{kind: continuous, horizon: 8, dof: 7, step_period: 0.1}}, "
                           f"queue: {queue}, queue_depth: {queue_depth}, max_age_ms: {max_age_ms}}}")
    lines.append(f"      names: [{', '.join(inputs)}]")
    lines += body
    lines += ["    streams:", f"      names: [{', '.join(stream_name(k, i) for i in range(MAX_STREAMS) for k in ('image', 'joints'))}]"]
    lines += streams
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# child roles
# ---------------------------------------------------------------------------------------------

def _make_message(kind: str):
    if kind == "image":
        from sensor_msgs.msg import Image
        import numpy as np
        msg = Image(height=HEIGHT, width=WIDTH, encoding="rgb8", step=WIDTH * 3)
        msg.data = np.random.default_rng(0).integers(0, 256, HEIGHT * WIDTH * 3, dtype=np.uint8).tobytes()
        return msg
    from sensor_msgs.msg import JointState
    return JointState(name=list(JOINTS), position=[0.1 * i for i in range(7)],
                      velocity=[0.0] * 7)


def role_pub(args) -> int:
    """Publish ``--streams`` trigger topics at ``--rate`` for ``--duration`` s; write what was
    sent (per topic, every stamp) to ``--out``."""
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from builtin_interfaces.msg import Time

    rclpy.init()
    node = rclpy.create_node("ros_latency_pub")
    qos = QoSProfile(depth=PUB_DEPTH, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE)
    msg_type = type(_make_message(args.kind))
    topics = [trigger_topic(args.kind, i, args.target) for i in range(args.streams)]
    pubs = [node.create_publisher(msg_type, t, qos) for t in topics]
    msgs = [_make_message(args.kind) for _ in topics]
    deadline = time.monotonic() + 60
    while any(p.get_subscription_count() < 1 for p in pubs):
        if time.monotonic() > deadline:
            print("pub: no subscriber matched", file=sys.stderr)
            return 1
        time.sleep(0.05)
    time.sleep(0.5)  # let the match settle on both sides
    period = 1.0 / args.rate
    n = int(round(args.duration * args.rate))
    sent = {t: [] for t in topics}
    t0 = time.monotonic()
    for k in range(n):
        wake = t0 + k * period
        delay = wake - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for t, pub, msg in zip(topics, pubs, msgs):
            now = time.time_ns()
            msg.header.stamp = Time(sec=now // 1_000_000_000, nanosec=now % 1_000_000_000)
            pub.publish(msg)
            sent[t].append(now)
    late = (time.monotonic() - t0) - (n - 1) * period
    time.sleep(0.5)  # reliable writer: let the last samples go out
    Path(args.out).write_text(json.dumps({"sent": sent, "t0_wall_ns": sent[topics[0]][0] if n else 0,
                                          "late_s": late, "cpu_s": time.process_time()}))
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def role_sub(args) -> int:
    """Record every ActionChunk (node's ``~/actions`` or the echo's) and Status until SIGINT;
    write them to ``--out``. Writes ``--ready`` once the answer topic has a publisher."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from capsule_ros.msg import ActionChunk, Status

    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    from rclpy.signals import SignalHandlerOptions
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("ros_latency_sub")
    qos = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE)
    answers, statuses = [], []

    def on_action(m):
        now = time.time_ns()
        answers.append((m.stream, m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec, now,
                        m.encode_ms, m.restore_ms, m.append_ms, m.act_ms, m.commit_ms, m.seq,
                        m.dropped))

    def on_status(m):
        statuses.append((m.stream, m.code, m.text[:200]))
    topic = f"{NODE}/actions" if args.target == "node" else f"{ECHO_NS}/actions"
    sub = node.create_subscription(ActionChunk, topic, on_action, qos)
    node.create_subscription(Status, f"{NODE}/status", on_status, qos)
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    ready = False
    while not stop:
        ex.spin_once(timeout_sec=0.05)
        if not ready and sub.get_publisher_count() > 0:
            Path(args.ready).write_text("ok")
            ready = True
    Path(args.out).write_text(json.dumps({"answers": answers, "statuses": statuses}))
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def role_echo(args) -> int:
    """The transport floor: every trigger topic of both kinds, with the node's subscription QoS
    and executor; each message answered by an ActionChunk with its stamp, from the callback.
    ``encode_ms`` carries publish -> callback (one way in)."""
    import rclpy
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState
    from capsule_ros.msg import ActionChunk

    rclpy.init()
    node = rclpy.create_node("echo", namespace=NS)
    answer_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                            history=HistoryPolicy.KEEP_LAST)
    pub = node.create_publisher(ActionChunk, f"{ECHO_NS}/actions", answer_qos)
    in_qos = QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in
                           ("history", "reliability", "durability")}, depth=5)
    if args.input_qos == "reliable":  # as the node's input_qos() for ``qos: reliable``
        in_qos = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST,
                            reliability=ReliabilityPolicy.RELIABLE)
    group = MutuallyExclusiveCallbackGroup()
    values = [0.0] * 56

    def echo(stream, m):
        now = time.time_ns()
        stamp = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
        out = ActionChunk(stream=stream, horizon=8, dof=7, step_period=0.1, values=values,
                          names=[f"a{i}" for i in range(7)])
        out.header.stamp = m.header.stamp
        out.encode_ms = (now - stamp) / 1e6
        pub.publish(out)
    for i in range(MAX_STREAMS):
        for kind, t in (("image", Image), ("joints", JointState)):
            node.create_subscription(t, trigger_topic(kind, i, "echo"),
                                     lambda m, s=stream_name(kind, i): echo(s, m), in_qos,
                                     callback_group=group)
    ex = (MultiThreadedExecutor(num_threads=3) if args.executor == "multi"
          else SingleThreadedExecutor())
    ex.add_node(node)
    try:
        ex.spin()
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# the orchestrator
# ---------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def proc_jiffies(pids: list[int]) -> int:
    """utime + stime of these processes and their children's threads (process groups)."""
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


# the inputs' reader history (--input-depth): what the node's executor may fall behind by
INPUT_DEPTH = 5
# the publisher's (a driver's) writer history (env CAPSULE_BENCH_PUB_DEPTH): what a reliable
# writer keeps for a reader that has not acknowledged yet
PUB_DEPTH = int(os.environ.get("CAPSULE_BENCH_PUB_DEPTH", "10"))


class Bench:
    def __init__(self, workdir: Path, domain: int, echo_executor: str, queue: str,
                 queue_depth: int, max_age_ms: float, input_qos: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.domain = workdir, domain
        self.env = dict(os.environ, **CHILD_ENV, ROS_DOMAIN_ID=str(domain),
                        ROS_HOME=str(workdir / "ros_home"), ROS_LOG_DIR=str(workdir / "ros_log"))
        self.env.pop("ROS_LOCALHOST_ONLY", None)
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        params = node_params(workdir / "params.yaml", queue, queue_depth, max_age_ms, input_qos)
        self.node = self.spawn("node", ["capsule_node", "--ros-args", "--params-file", str(params),
                                        "-r", f"__ns:={NS}"])
        self.echo = self.spawn("echo", [sys.executable, str(HERE), "--role", "echo",
                                        "--executor", echo_executor, "--input-qos", input_qos])
        os.environ.update(CHILD_ENV, ROS_DOMAIN_ID=str(domain))
        import rclpy
        from capsule_ros.srv import CapsuleOp
        rclpy.init()
        self.rclpy = rclpy
        self.me = rclpy.create_node("ros_latency_bench")
        self.client = self.me.create_client(CapsuleOp, f"{NODE}/capsule")
        self.CapsuleOp = CapsuleOp
        self.wait_active()

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self.logs.append(log)
        p = subprocess.Popen(cmd, env=self.env, cwd=self.workdir, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def stats(self, timeout: float = 30.0) -> dict | None:
        req = self.CapsuleOp.Request(op="stats")
        future = self.client.call_async(req)
        self.rclpy.spin_until_future_complete(self.me, future, timeout_sec=timeout)
        if not future.done() or future.result() is None or not future.result().ok:
            return None
        return json.loads(future.result().json)

    def wait_active(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node.poll() is not None:
                raise RuntimeError(f"capsule_node exited {self.node.returncode}; see "
                                   f"{self.workdir / 'node.log'}")
            if self.client.wait_for_service(timeout_sec=1.0) and self.node_state() == "active":
                return
            time.sleep(0.5)
        raise RuntimeError(f"capsule_node not active after {timeout} s; see {self.workdir / 'node.log'}")

    def node_state(self) -> str | None:
        from lifecycle_msgs.srv import GetState
        cli = self.me.create_client(GetState, f"{NODE}/get_state")
        try:
            if not cli.wait_for_service(timeout_sec=2.0):
                return None
            fut = cli.call_async(GetState.Request())
            self.rclpy.spin_until_future_complete(self.me, fut, timeout_sec=5)
            return fut.result().current_state.label if fut.done() and fut.result() else None
        finally:
            self.me.destroy_client(cli)

    def run_row(self, kind: str, streams: int, rate: float, duration: float, warmup: float,
                target: str) -> dict:
        tag = f"{target}_{kind}_{streams}_{rate:g}_{time.monotonic_ns()}"
        sub_out, ready, pub_out = (self.workdir / f"{tag}_{x}" for x in ("sub.json", "ready", "pub.json"))
        names = [stream_name(kind, i) for i in range(streams)]
        before = self.stats() if target == "node" else None
        sub = self.spawn(f"sub_{tag}", [sys.executable, str(HERE), "--role", "sub", "--target", target,
                                        "--out", str(sub_out), "--ready", str(ready)])
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline or sub.poll() is not None:
                raise RuntimeError("the action subscriber never matched")
            time.sleep(0.05)
        load0 = os.getloadavg()[0]
        busy0, total0 = cpu_jiffies()
        ours = [self.node.pid, self.echo.pid, sub.pid, os.getpid()]
        ours0 = proc_jiffies(ours)
        node0 = proc_jiffies([self.node.pid if target == "node" else self.echo.pid])
        pub = self.spawn(f"pub_{tag}", [sys.executable, str(HERE), "--role", "pub", "--kind", kind,
                                        "--streams", str(streams), "--rate", str(rate),
                                        "--duration", str(duration), "--target", target,
                                        "--out", str(pub_out)])
        pub.wait(timeout=duration + 120)
        if pub.returncode != 0 or not pub_out.exists():
            raise RuntimeError(f"publisher failed ({pub.returncode}); see {self.workdir}")
        sent = json.loads(pub_out.read_text())
        # every accepted trigger answered or dropped: the node's queues empty
        after = None
        if target == "node":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                after = self.stats()
                if after and all(after["accounting"][n]["pending"] == 0 for n in names):
                    break
                time.sleep(0.2)
        time.sleep(1.0)  # answers in flight reach the subscriber
        busy1, total1 = cpu_jiffies()
        # the publisher has exited (reaped): it reports its own CPU time
        ours1 = proc_jiffies(ours) + int(sent.get("cpu_s", 0.0) * os.sysconf("SC_CLK_TCK"))
        node1 = proc_jiffies([self.node.pid if target == "node" else self.echo.pid])
        os.killpg(sub.pid, signal.SIGINT)
        sub.wait(timeout=30)
        got = json.loads(sub_out.read_text())
        hz = os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        wall_s = (total1 - total0) / hz / ncpu
        machine_cores = (busy1 - busy0) / hz / wall_s if wall_s > 0 else 0.0
        ours_cores = (ours1 - ours0) / hz / wall_s if wall_s > 0 else 0.0
        return self._row(kind, streams, rate, warmup, target, names, sent, got, before, after) | {
            "load1": round(load0, 2), "machine_cores": round(machine_cores, 2),
            "others_cores": round(max(0.0, machine_cores - ours_cores), 2),
            "node_cores": round((node1 - node0) / hz / wall_s, 2) if wall_s > 0 else None,
            "publisher_late_s": round(sent["late_s"], 4)}

    def _row(self, kind, streams, rate, warmup, target, names, sent, got, before, after) -> dict:
        topics = [trigger_topic(kind, i, target) for i in range(streams)]
        stream_of = {t: stream_name(kind, i) for i, t in enumerate(topics)}
        sent_stamps = {(stream_of[t], s): k for t, ss in sent["sent"].items() for k, s in enumerate(ss)}
        n_sent = sum(len(v) for v in sent["sent"].values())
        cutoff = sent["t0_wall_ns"] + int(warmup * 1e9)
        e2e, engine, encode, over, first_over, floor_in = [], [], [], [], [], []
        by_tick: dict[int, list] = {}
        matched = 0
        for a in got["answers"]:
            stream, stamp, recv, enc, res, app, act, com, seq, dropped = a
            if (stream, stamp) not in sent_stamps:
                continue
            matched += 1
            if stamp < cutoff:
                continue
            e = (recv - stamp) / 1e6
            eng = res + app + act + com
            e2e.append(e)
            if target == "node":
                engine.append(eng)
                encode.append(enc)
                over.append(e - enc - eng)
                by_tick.setdefault(sent_stamps[(stream, stamp)], []).append((recv, e - enc - eng))
            else:
                floor_in.append(enc)
        for items in by_tick.values():
            first_over.append(min(items)[1])
        per_stream = {stream_of[t]: 0 for t in topics}
        for a in got["answers"]:
            if (a[0], a[1]) in sent_stamps:
                per_stream[a[0]] += 1
        row = {"message": "JointState" if kind == "joints" else f"Image {WIDTH}x{HEIGHT} rgb8",
               "streams": streams, "rate_hz": rate, "target": target, "sent": n_sent,
               "answers_per_stream": per_stream,
               "answers_seen": matched, "samples": len(e2e),
               "e2e_p50_ms": r3(pct(e2e, 50)), "e2e_p99_ms": r3(pct(e2e, 99))}
        if target == "echo":
            row.update(floor_in_p50_ms=r3(pct(floor_in, 50)), floor_in_p99_ms=r3(pct(floor_in, 99)))
            return row
        row.update(engine_p50_ms=r3(pct(engine, 50)), engine_p99_ms=r3(pct(engine, 99)),
                   encode_p50_ms=r3(pct(encode, 50)), encode_p99_ms=r3(pct(encode, 99)),
                   overhead_p50_ms=r3(pct(over, 50)), overhead_p99_ms=r3(pct(over, 99)),
                   overhead_first_p50_ms=r3(pct(first_over, 50)),
                   overhead_first_p99_ms=r3(pct(first_over, 99)))
        acc = {k: 0 for k in ("received", "answered", "superseded", "overflowed", "stale",
                              "rejected", "failed", "pending")}
        for n in names:
            a0, a1 = before["accounting"][n], after["accounting"][n]
            for k in acc:
                acc[k] += a1[k] - (a0[k] if k != "pending" else 0)
        row.update(acc)
        row["dropped"] = acc["superseded"] + acc["overflowed"] + acc["stale"]
        row["statuses"] = len(got["statuses"])
        return row

    def close(self) -> None:
        try:
            self.me.destroy_node()
            self.rclpy.try_shutdown()
        except Exception:
            pass
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=15)
        for log in self.logs:
            log.close()


def serdes_costs(repeats: int = 51) -> dict:
    """CPU cost in this process of what the transport does to each message besides moving it:
    rclpy's serialize_message / deserialize_message (Python <-> C conversion + CDR), medians."""
    from rclpy.serialization import deserialize_message, serialize_message
    out = {}
    for kind in ("joints", "image"):
        msg = _make_message(kind)
        ser, des = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            raw = serialize_message(msg)
            t1 = time.perf_counter()
            deserialize_message(raw, type(msg))
            t2 = time.perf_counter()
            ser.append((t1 - t0) * 1e3)
            des.append((t2 - t1) * 1e3)
        out["JointState" if kind == "joints" else f"Image {WIDTH}x{HEIGHT} rgb8"] = {
            "bytes": len(raw), "serialize_ms": r3(statistics.median(ser)),
            "deserialize_ms": r3(statistics.median(des))}
    return out


def quietest(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["others_cores"])


def latency_main(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ros_latency_"))
    domain = args.domain or random.Random(time.monotonic_ns()).randint(120, 220)
    machine = args.machine or machine_label()
    print(f"machine {machine}  ROS_DOMAIN_ID {domain}  workdir {workdir}  "
          f"load {os.getloadavg()[0]:.2f}")
    plan = [(kind, streams, rate) for kind in ("joints", "image") for streams in (1, 4)
            for rate in args.rates]
    if args.only:
        plan = [p for p in plan if f"{p[0]}:{p[1]}:{p[2]:g}" in args.only.split(",")]
    rows = []
    bench = None
    try:
        for kind, streams, rate in plan:
            if bench is None or bench.kind != kind:
                # a fresh node, echo and ROS domain per message kind: after ~16 subscriber
                # processes had come and gone in one domain, new ones stopped receiving
                # ActionChunks from the node and from the bare echo alike (Status still came)
                if bench is not None:
                    bench.close()
                    domain = random.Random(time.monotonic_ns()).randint(120, 220)
                bench = Bench(workdir / kind, domain, args.echo_executor, "latest", 8, 0.0,
                              args.input_qos)
                bench.kind = kind
            runs = []
            if args.floor_only:
                floor = bench.run_row(kind, streams, rate, args.floor_duration, args.warmup, "echo")
                print(json.dumps(floor), flush=True)
                continue
            for attempt in range(args.attempts):
                floor = bench.run_row(kind, streams, rate, args.floor_duration, args.warmup, "echo")
                row = bench.run_row(kind, streams, rate, args.duration, args.warmup, "node")
                row["floor_p50_ms"], row["floor_p99_ms"] = floor["e2e_p50_ms"], floor["e2e_p99_ms"]
                row["floor_in_p50_ms"] = floor["floor_in_p50_ms"]
                row["floor_others_cores"] = floor["others_cores"]
                row["floor_sent"], row["floor_answered"] = floor["sent"], floor["answers_seen"]
                row["floor_answers_per_stream"] = floor["answers_per_stream"]
                row["attempts"] = attempt + 1
                runs.append(row)
                busy = max(row["others_cores"], floor["others_cores"])
                print(f"  {row['message']:<22} x{streams} {rate:>4g} Hz: sent {row['sent']} received "
                      f"{row['received']} answered {row['answered']} (floor {row['floor_answered']}/"
                      f"{row['floor_sent']}); e2e p50 {row['e2e_p50_ms']} "
                      f"overhead p50 {row['overhead_p50_ms']} floor p50 {row['floor_p50_ms']} "
                      f"(others {busy:.2f} cores, node {row['node_cores']} cores)", flush=True)
                if busy <= args.busy:
                    break
            rows.append(quietest(runs))
        serdes = serdes_costs()
        if args.floor_only:
            return
    finally:
        if bench is not None:
            bench.close()
    doc = {"machine": machine, "rmw": os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp (default)"),
           "setup": {"node": "installed capsule_node, own process, model.threads 1, default model "
                             "(config/models/default_qwen3_5.json, float32, cpu), max_context 4096, "
                             "rebase; streams trigger-only (no context), queue latest",
                     "publisher": "own process, reliable keep-last 10, stamps header with the system "
                                  "clock just before each publish; 4 streams published together",
                     "subscriber": "own process, reliable keep-last 1000, receive time at callback entry",
                     "floor": f"echo process (rclpy, {args.echo_executor}-threaded executor, node's "
                              "input QoS) answering each message with an ActionChunk from the callback",
                     "duration_s": args.duration, "floor_duration_s": args.floor_duration,
                     "warmup_s": args.warmup},
           "serdes": serdes, "rows": rows}
    print_table(doc)
    write_results(doc, args.out or ROOT / "bench" / "results" / "ros_latency.json")


def print_table(doc: dict) -> None:
    print(f"\ncapsule_node end to end on `{doc['machine']}` (ms; overhead = e2e - encode - engine; "
          f"floor = the same messages through a bare rclpy echo)\n")
    hdr = ("| message | streams | Hz | e2e p50 | e2e p99 | engine p50 | encode p50 | overhead p50 "
           "| overhead p99 | 1st-of-period overhead p50 | floor p50 | floor p99 | sent | received "
           "| answered | dropped | others cores |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in doc["rows"]:
        print(f"| {r['message']} | {r['streams']} | {r['rate_hz']:g} | {r['e2e_p50_ms']} | "
              f"{r['e2e_p99_ms']} | {r['engine_p50_ms']} | {r['encode_p50_ms']} | "
              f"{r['overhead_p50_ms']} | {r['overhead_p99_ms']} | {r['overhead_first_p50_ms']} | "
              f"{r['floor_p50_ms']} | {r['floor_p99_ms']} | {r['sent']} | {r['received']} | "
              f"{r['answered']} | {r['dropped']} | {max(r['others_cores'], r['floor_others_cores']):.2f} |")
    print("\nrclpy serialize / deserialize in one process (ms, medians): " + "; ".join(
        f"{k} ({v['bytes']} B) {v['serialize_ms']} / {v['deserialize_ms']}" for k, v in doc["serdes"].items()))


# ---------------------------------------------------------------------------------------------
# the soak: a timed replay of 4 cameras
# ---------------------------------------------------------------------------------------------

def soak_main(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="soak_replay_"))
    domain = args.domain or random.Random(time.monotonic_ns()).randint(120, 220)
    machine = args.machine or machine_label()
    print(f"machine {machine}  ROS_DOMAIN_ID {domain}  workdir {workdir}  "
          f"load {os.getloadavg()[0]:.2f}; {args.soak_streams} x {WIDTH}x{HEIGHT} rgb8 at "
          f"{args.soak_rate:g} Hz for {args.soak_duration:g} s", flush=True)
    bench = Bench(workdir, domain, "single", args.queue, args.queue_depth, args.max_age_ms,
                  args.input_qos)
    try:
        row = bench.run_row("image", args.soak_streams, args.soak_rate, args.soak_duration, 0.0, "node")
        after = bench.stats()
        got = json.loads(sorted(workdir.glob("node_image_*_sub.json"))[-1].read_text())
        sent = json.loads(sorted(workdir.glob("node_image_*_pub.json"))[-1].read_text())
    finally:
        bench.close()
    per_stream = {}
    answers_by = {}
    for a in got["answers"]:
        answers_by.setdefault(a[0], []).append(a)
    ok = True
    for i in range(args.soak_streams):
        name = stream_name("image", i)
        acc = after["accounting"][name]
        n_sent = len(sent["sent"][trigger_topic("image", i)])
        parts = sum(acc[k] for k in ("answered", "superseded", "overflowed", "stale", "rejected",
                                     "failed", "pending"))
        mine = answers_by.get(name, [])
        seqs = [a[8] for a in mine]
        e2e = [(a[2] - a[1]) / 1e6 for a in mine]
        entry = dict(acc, sent=n_sent, not_received=n_sent - acc["received"],
                     balanced=parts == acc["received"], all_received=acc["received"] == n_sent,
                     answers_seen=len(mine), seq_gapless=seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True,
                     dropped_in_answers=sum(a[9] for a in mine),
                     e2e_p50_ms=r3(pct(e2e, 50)), e2e_p99_ms=r3(pct(e2e, 99)))
        ok &= entry["balanced"] and entry["all_received"] and entry["answers_seen"] == acc["answered"]
        per_stream[name] = entry
    doc = {"machine": machine, "duration_s": args.soak_duration, "rate_hz": args.soak_rate,
           "streams": args.soak_streams, "message": f"Image {WIDTH}x{HEIGHT} rgb8",
           "queue": args.queue, "queue_depth": args.queue_depth, "max_age_ms": args.max_age_ms,
           "setup": "timed replay: one publisher process (reliable writer, keep last 10), the node "
                    f"(installed capsule_node, model.threads 1, inputs subscribed {args.input_qos} "
                    f"keep last {INPUT_DEPTH}, trigger-only streams), the action subscriber; separate processes",
           "input_qos": args.input_qos,
           "status_codes": {str(c): sum(1 for st in got["statuses"] if st[1] == c)
                            for c in sorted({st[1] for st in got["statuses"]})},
           "every_trigger_accounted": ok, "load1_at_start": row["load1"],
           "machine_cores": row["machine_cores"], "others_cores": row["others_cores"],
           "node_cores": row["node_cores"], "publisher_late_s": row["publisher_late_s"],
           "statuses": len(got["statuses"]), "streams_accounting": per_stream}
    print(f"\nsoak replay on `{machine}`: {args.soak_streams} x {WIDTH}x{HEIGHT} rgb8 at "
          f"{args.soak_rate:g} Hz, {args.soak_duration:g} s, queue {args.queue}\n")
    hdr = ("| stream | sent | received | answered | superseded | overflowed | stale | rejected "
           "| failed | pending | received = sum of outcomes | received = sent | e2e p50 ms | e2e p99 ms |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for name, e in per_stream.items():
        print(f"| {name} | {e['sent']} | {e['received']} | {e['answered']} | {e['superseded']} | "
              f"{e['overflowed']} | {e['stale']} | {e['rejected']} | {e['failed']} | {e['pending']} | "
              f"{'yes' if e['balanced'] else 'NO'} | {'yes' if e['all_received'] else 'no'} | {e['e2e_p50_ms']} | "
              f"{e['e2e_p99_ms']} |")
    write_results(doc, args.out or ROOT / "bench" / "results" / f"soak_replay_{machine}.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("pub", "sub", "echo"), help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="joints", help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=10.0, help=argparse.SUPPRESS)
    ap.add_argument("--target", default="node", help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--executor", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--rates", default="10,30", help="trigger rates (Hz) of the latency rows")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per node row")
    ap.add_argument("--floor-duration", type=float, default=8.0, help="seconds per echo row")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds not in the latency figures")
    ap.add_argument("--busy", type=float, default=0.5,
                    help="re-run a row when other processes used more cores than this")
    ap.add_argument("--attempts", type=int, default=2, help="runs of a busy row at most")
    ap.add_argument("--echo-executor", choices=("multi", "single"), default="single")
    ap.add_argument("--floor-only", action="store_true", help="only the echo rows, printed as JSON")
    ap.add_argument("--only", default="", help="rows as kind:streams:rate, e.g. image:1:10")
    ap.add_argument("--input-qos", choices=("reliable", "sensor_data"), default="reliable",
                    help="the node's (and the echo's) input subscriptions: reliable keep-last 5 "
                         "(default), or sensor_data (best effort: Fast DDS drops most 640x480 "
                         "images on this machine, see bench/README.md)")
    ap.add_argument("--transports", default="",
                    help="FASTDDS_BUILTIN_TRANSPORTS for every process (e.g. LARGE_DATA); default: "
                         "Fast DDS's own default (SHM + UDPv4)")
    ap.add_argument("--domain", type=int, default=0)
    ap.add_argument("--machine", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--input-depth", type=int, default=5, help="the node's inputs' qos_depth")
    ap.add_argument("--soak", action="store_true", help="the 5-minute timed replay instead")
    ap.add_argument("--soak-duration", type=float, default=300.0)
    ap.add_argument("--soak-rate", type=float, default=15.0)
    ap.add_argument("--soak-streams", type=int, default=4)
    ap.add_argument("--queue", default="latest")
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--max-age-ms", type=float, default=0.0)
    args = ap.parse_args()
    global INPUT_DEPTH
    INPUT_DEPTH = args.input_depth
    if args.role == "pub":
        args.duration = float(args.duration)
        return role_pub(args)
    if args.role == "sub":
        return role_sub(args)
    if args.role == "echo":
        return role_echo(args)
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.transports:
        os.environ["FASTDDS_BUILTIN_TRANSPORTS"] = args.transports  # children inherit it
    if args.soak:
        soak_main(args)
    else:
        latency_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
