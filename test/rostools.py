"""Harness for tests that drive the node through the real ros2 CLI (launch, lifecycle, param,
service), built from ../shared/third_party by scripts/tools_overlay.sh (see ROS_SETUP.md).

CI guards, all here so that no test can forget one:
- every ``ros2`` call runs under ``timeout`` (and a Python-side deadline), ``--no-daemon`` where the
  verb offers it (no daemon process outlives a test), in its own session (process group);
- long-running children (``ros2 launch``) start with ``start_new_session=True`` and are killed as
  a process group when the test ends (:meth:`RosCli.close`, a fixture finalizer);
- a unique namespace and ROS_DOMAIN_ID per test, discovery on localhost only, one OpenMP / torch
  thread per node process;
- waits are for states and counters, with generous deadlines; nothing asserts on elapsed time.

Without the archive beside the checkout the tests that need it skip, saying so; with CI=true a
missing archive is an error. A missing rclpy or build is never a skip (see :func:`tools_env`).
"""
from __future__ import annotations

import ast
import functools
import os
import random
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "capsule_ros"
NODE_NAME = "capsule_node"
LAUNCH_FILE = "capsule_ros.launch.py"

#: verbs that take --no-daemon (ros2cli.node.strategy.add_arguments); others never use a daemon
NO_DAEMON_VERBS = {
    ("lifecycle", "get"), ("lifecycle", "set"), ("lifecycle", "list"), ("lifecycle", "nodes"),
    ("param", "get"), ("param", "set"), ("param", "describe"), ("param", "list"),
    ("param", "dump"), ("param", "load"), ("param", "delete"),
    ("node", "list"), ("node", "info"),
    ("topic", "list"), ("topic", "info"), ("topic", "type"), ("topic", "find"), ("topic", "echo"),
    ("service", "list"), ("service", "type"), ("service", "find"),
}

#: what a node process may use: one thread (2-core CI box; OpenMP spin-waits make 2 contended
#: threads much slower than 1), unbuffered output so the log is there when a test fails
NODE_PROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "RCUTILS_COLORIZED_OUTPUT": "0", "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}


def tools_archive() -> Path:
    return Path(os.environ.get("CAPSULE_TOOLS_ARCHIVE")
                or REPO.parent / "shared" / "third_party" / "ros2_jazzy_tools.tar.gz")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@functools.cache
def _build_tools_env() -> dict[str, str]:
    """Build the overlay if needed (cached by the script), then the environment that
    scripts/env.sh + scripts/tools_env.sh make, as a dict (one place defines the paths)."""
    build = subprocess.run(["bash", str(REPO / "scripts" / "tools_overlay.sh")], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        raise RuntimeError(f"scripts/tools_overlay.sh failed (exit {build.returncode}):\n"
                           f"{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    dump = subprocess.run(
        ["bash", "-c", '. scripts/env.sh >/dev/null && . scripts/tools_env.sh && env -0'],
        cwd=REPO, capture_output=True, timeout=60, check=True)
    env = dict(item.split("=", 1) for item in dump.stdout.decode().split("\0") if "=" in item)
    if "CAPSULE_ROS_TOOLS" not in env:
        raise RuntimeError("scripts/tools_env.sh found no overlay in .tools/ after building it")
    return env


def tools_env() -> dict[str, str]:
    """The environment with the ros2 tools on it. Skips the calling test when the archive is not
    beside the checkout (outside CI); fails when CI=true, or when the overlay or this package's
    build is broken -- those are errors, not reasons to skip."""
    archive = tools_archive()
    if not archive.is_file():
        if in_ci():
            pytest.fail(f"CI=true but the ros2 tools archive {archive} is missing: the CLI tests "
                        f"must run in CI", pytrace=False)
        pytest.skip(f"ros2 CLI tools archive not beside the checkout ({archive}); "
                    f"see ../shared/ROS_SETUP.md")
    try:
        env = _build_tools_env()
    except (RuntimeError, subprocess.SubprocessError) as e:
        pytest.fail(f"ros2 tools overlay unusable: {e}", pytrace=False)
    node = Path(env.get("CAPSULE_ROS_ROOT", str(REPO))) / "install" / PACKAGE / "lib" / PACKAGE / NODE_NAME
    if not node.is_file():
        pytest.fail(f"{node} is missing: run scripts/setup.sh (colcon build)", pytrace=False)
    return dict(env)


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)   # start_new_session: pgid == pid
    except ProcessLookupError:
        pass


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return (f"$ {' '.join(self.args)}\n[exit {self.returncode}]\n"
                f"{self.stdout[-4000:]}{self.stderr[-4000:]}")


class Proc:
    """A long-running child (``ros2 launch ...``) in its own session, output to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.args = args
        self.log = log
        self._log_file = open(log, "wb")   # noqa: SIM115 - closed in wait()/kill()
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                      stdout=self._log_file, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        """``sig`` to the whole group, as a terminal's Ctrl-C (SIGINT) reaches launch and node."""
        _kill_group(self.popen, sig)

    def wait(self, timeout: float) -> int:
        """Exit status; kills the group (and fails) when it has not exited within ``timeout``."""
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.args)} did not exit within {timeout} s; "
                                 f"killed. Log tail:\n{self.text()[-4000:]}") from None
        self._log_file.close()
        return rc

    def kill(self) -> None:
        _kill_group(self.popen, signal.SIGKILL)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._log_file.close()

    def node_pids(self, executable: str = NODE_NAME) -> list[int]:
        """PIDs of the node processes launch started (children running ``executable``)."""
        import psutil
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                if any(Path(a).name == executable for a in child.cmdline()[:3]):
                    pids.append(child.pid)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        return pids


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.5, detail: Callable[[], str] | None = None) -> Any:
    """Poll ``condition`` until it returns a truthy value (returned); a generous deadline only
    bounds a hang -- nothing asserts on how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# the per-test CLI driver
# ---------------------------------------------------------------------------------------------

_used_domains: set[int] = set()


def unique_domain() -> int:
    """A ROS_DOMAIN_ID not used by an earlier test of this session (1..100; Fast DDS's port
    formula allows up to 232, 100 keeps clear of the ephemeral range)."""
    rng = random.Random(os.getpid() * 7919 + time.monotonic_ns())
    free = [d for d in range(1, 101) if d not in _used_domains] or list(range(1, 101))
    domain = rng.choice(free)
    _used_domains.add(domain)
    return domain


def unique_namespace(test_name: str) -> str:
    stem = re.sub(r"[^a-zA-Z0-9_]", "_", test_name)[:40].strip("_") or "t"
    return f"cli_{stem}_{uuid.uuid4().hex[:6]}"


@dataclass
class RosCli:
    """Runs ``ros2`` for one test: its own domain and namespace, every child killed at the end."""

    env: dict[str, str]
    workdir: Path
    namespace: str
    domain: int
    procs: list[Proc] = field(default_factory=list)
    calls: list[Result] = field(default_factory=list)

    @classmethod
    def create(cls, base_env: dict[str, str], workdir: Path, test_name: str) -> RosCli:
        domain = unique_domain()
        env = dict(base_env)
        env.update(NODE_PROCESS_ENV)
        env["ROS_DOMAIN_ID"] = str(domain)
        env["ROS_LOG_DIR"] = str(workdir / "ros_log")
        env["ROS_HOME"] = str(workdir / "ros_home")   # launch's log dir, persisted capsules, ...
        env.pop("ROS_LOCALHOST_ONLY", None)           # deprecated; conflicts with the range
        return cls(env=env, workdir=workdir, namespace=unique_namespace(test_name), domain=domain)

    # -- names ------------------------------------------------------------------------------
    @property
    def node(self) -> str:
        return f"/{self.namespace}/{NODE_NAME}"

    def topic(self, relative: str) -> str:
        """A node-private name (``~/actions`` -> ``/<ns>/capsule_node/actions``)."""
        return f"{self.node}/{relative.removeprefix('~/')}"

    # -- one-shot calls ---------------------------------------------------------------------
    def ros2(self, *args: str, timeout: float = 60.0, check: bool = True) -> Result:
        """``timeout <t> ros2 <args>`` with --no-daemon where the verb takes it."""
        argv = [str(a) for a in args]
        if tuple(argv[:2]) in NO_DAEMON_VERBS and "--no-daemon" not in argv:
            argv.insert(2, "--no-daemon")
        cmd = ["timeout", "-k", "5", str(int(timeout)), "ros2", *argv]
        popen = subprocess.Popen(cmd, env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        try:
            out, err = popen.communicate(timeout=timeout + 20)   # backstop for `timeout` itself
        except subprocess.TimeoutExpired:
            _kill_group(popen)
            out, err = popen.communicate()
        finally:
            _kill_group(popen)   # anything the call left behind in its group
        result = Result(cmd, popen.returncode, out, err)
        self.calls.append(result)
        if check and result.returncode != 0:
            raise AssertionError(f"ros2 call failed:\n{result}")
        return result

    # -- launch -----------------------------------------------------------------------------
    def launch(self, **arguments: Any) -> Proc:
        """``ros2 launch capsule_ros capsule_ros.launch.py namespace:=<ns> k:=v ...``."""
        arguments.setdefault("namespace", self.namespace)
        argv = ["ros2", "launch", PACKAGE, LAUNCH_FILE]
        for key, value in arguments.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            argv.append(f"{key}:={value}")
        proc = Proc(argv, self.env, self.workdir / f"launch_{len(self.procs)}.log", self.workdir)
        self.procs.append(proc)
        return proc

    # -- calls that need the node discovered ---------------------------------------------
    def node_call(self, *args: str, timeout: float = 60.0, discovery: float = 120.0) -> Result:
        """``ros2 <verb> <sub> <node> ...``: a fresh CLI process (--no-daemon) may not have
        discovered the node within its spin time ("Node not found"); retried for that only."""
        holder: list[Result] = []

        def attempt() -> bool:
            r = self.ros2(*args, timeout=timeout, check=False)
            holder.append(r)
            return "Node not found" not in r.output
        wait_for(attempt, discovery, f"{' '.join(args)}: the node to be discovered",
                 interval=0.5, detail=lambda: str(holder[-1]) if holder else "")
        return holder[-1]

    # -- the node on its own, as `ros2 run` starts it ----------------------------------------
    def node_env_without_tools(self) -> dict[str, str]:
        """This test's environment minus the tools overlay and the archive's diagnostic_updater:
        what a robot's node has when the tools are not installed."""
        env = dict(self.env)
        tools = env.get("CAPSULE_ROS_TOOLS", str(REPO / ".tools"))
        for var in ("PATH", "PYTHONPATH", "AMENT_PREFIX_PATH", "LD_LIBRARY_PATH"):
            kept = [p for p in env.get(var, "").split(os.pathsep) if p and not p.startswith(tools)]
            env[var] = os.pathsep.join(kept)
        for var in ("CAPSULE_ROS_TOOLS", "CAPSULE_DIAGNOSTICS_PATH"):
            env.pop(var, None)
        return env

    def run_node(self, cli_args: list[str], without_tools: bool = True) -> Proc:
        """The installed ``capsule_node`` executable with ``cli_args`` (``NodeArgs.cli_args()``)."""
        root = Path(self.env.get("CAPSULE_ROS_ROOT", str(REPO)))
        exe = root / "install" / PACKAGE / "lib" / PACKAGE / NODE_NAME
        env = self.node_env_without_tools() if without_tools else self.env
        proc = Proc([str(exe), *cli_args], env, self.workdir / f"node_{len(self.procs)}.log",
                    self.workdir)
        self.procs.append(proc)
        return proc

    # -- lifecycle --------------------------------------------------------------------------
    @staticmethod
    def _state(r: Result) -> str | None:
        m = re.search(r"^(\w+) \[\d+\]$", r.stdout, re.M)
        return m.group(1) if r.returncode == 0 and m else None

    def lifecycle_state(self, node: str | None = None) -> str | None:
        """``ros2 lifecycle get``: the state label (``active``), None if the call failed."""
        return self._state(self.node_call("lifecycle", "get", node or self.node, timeout=30))

    def wait_state(self, state: str, timeout: float = 300.0, node: str | None = None,
                   proc: Proc | None = None) -> None:
        """Until ``ros2 lifecycle get`` says ``state``; fails early if ``proc`` exited."""
        last: list[Result | None] = [None]

        def reached() -> bool:
            if proc is not None and not proc.running():
                raise AssertionError(f"launch exited ({proc.popen.returncode}) before the node "
                                     f"was {state}; log tail:\n{proc.text()[-4000:]}")
            last[0] = self.ros2("lifecycle", "get", node or self.node, timeout=30, check=False)
            return self._state(last[0]) == state
        wait_for(reached, timeout, f"{node or self.node} to be {state}", interval=0.5,
                 detail=lambda: f"last call: {last[0]}\n"
                                f"log tail:\n{proc.text()[-4000:] if proc else ''}")

    def lifecycle_set(self, transition: str, node: str | None = None,
                      timeout: float = 300.0) -> Result:
        """``ros2 lifecycle set <node> <transition>``."""
        return self.node_call("lifecycle", "set", node or self.node, transition, timeout=timeout)

    # -- parameters and services ------------------------------------------------------------
    def param(self, verb: str, *args: str, timeout: float = 60.0) -> Result:
        """``ros2 param <verb> <node> ...``."""
        return self.node_call("param", verb, self.node, *args, timeout=timeout)

    def call_service(self, service: str, srv_type: str, request: str,
                     timeout: float = 60.0) -> dict[str, Any]:
        """``ros2 service call``; the response's fields as a dict (parsed from its repr)."""
        r = self.ros2("service", "call", service, srv_type, request, timeout=timeout)
        return parse_response(r.stdout)

    # -- cleanup ----------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self.procs:
            if proc.running() or not proc._log_file.closed:
                proc.kill()


def parse_response(stdout: str) -> dict[str, Any]:
    """Fields of the response ``ros2 service call`` prints (``response:\\npkg.srv.X_Response(
    ok=True, names=['a'], ...)``), literal values only."""
    text = stdout.split("response:", 1)[-1].strip()
    call = ast.parse(text, mode="eval").body
    if not isinstance(call, ast.Call):
        raise ValueError(f"not a response repr: {text[:200]!r}")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


# ---------------------------------------------------------------------------------------------
# the test's side of the graph: the bag in, the answers counted
# ---------------------------------------------------------------------------------------------

class Feeder:
    """The test's own rclpy node on the test's domain.

    Publishes the bag's messages like a camera driver does -- best effort, keep-last (the
    sensor-data profile) -- and counts what the node publishes on ``answers`` (reliable
    subscriptions). ``feed`` is lockstep: after each trigger it waits until an answer stamped
    with that trigger's stamp has arrived (answers carry the trigger's header stamp), so every
    check is on counters. Matched events (cumulative counts) tell when a respawned node's readers
    and writers have matched ours.

    Best effort has no retransmission, and discovery is not symmetric: our writer may see the
    node's reader matched a moment before that reader accepts our writer's samples, so a first
    sample can be dropped. Like a camera that keeps streaming, ``feed`` publishes a trigger again
    (same bytes, same stamp) when no answer came after ``resend_after`` seconds; ``resent``
    counts those, and answers are matched to triggers by stamp, so counts stay exact.
    """

    def __init__(self, cli: RosCli, bag: Path, answers: dict[str, str],
                 triggers: tuple[str, ...] = ("/front_cam/image_raw", "/wrist_cam/image_raw")):
        import rclpy
        from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

        from capsule_ros.ros import bag_io
        from capsule_ros.ros.replay import import_msg_class

        self.cli = cli
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=cli.domain)
        self.node = rclpy.create_node(f"cli_feeder_{uuid.uuid4().hex[:6]}", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.triggers = triggers
        self.types = bag_io.bag_topics(bag)
        self.messages = [(m.topic, m.rawdata) for m in bag_io.read_messages(bag)]
        self.classes = {t: import_msg_class(ty) for t, ty in self.types.items()}
        self.cursor = 0
        self.published: dict[str, int] = {t: 0 for t in self.types}
        self.pub_matched: dict[str, Any] = {}
        self.sub_matched: dict[str, Any] = {}
        self.pubs = {}
        for topic, cls in self.classes.items():
            cb = PublisherEventCallbacks(matched=functools.partial(self._set, self.pub_matched, topic))
            self.pubs[topic] = self.node.create_publisher(cls, topic, qos_profile_sensor_data,
                                                          event_callbacks=cb)
        self.resent = 0
        self.sent_stamps: list[tuple[int, int]] = []   # of the triggers fed, in order
        self.received: dict[str, list[Any]] = {t: [] for t in answers}
        reliable = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.subs = []
        for topic, msgtype in answers.items():
            cb = SubscriptionEventCallbacks(matched=functools.partial(self._set, self.sub_matched, topic))
            self.subs.append(self.node.create_subscription(
                import_msg_class(msgtype), topic, self.received[topic].append, reliable,
                event_callbacks=cb))

    @staticmethod
    def _set(store: dict, topic: str, info: Any) -> None:
        store[topic] = info

    @staticmethod
    def stamp_of(msg: Any) -> tuple[int, int]:
        return (msg.header.stamp.sec, msg.header.stamp.nanosec)

    def answered(self, topic: str, stamps: list[tuple[int, int]] | None = None) -> set:
        """Distinct trigger stamps (all fed ones by default) that have an answer on ``topic``."""
        want = set(self.sent_stamps if stamps is None else stamps)
        return {self.stamp_of(m) for m in self.received[topic]} & want

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()

    # -- spinning ---------------------------------------------------------------------------
    def spin_until(self, condition: Callable[[], bool], timeout: float, what: str,
                   detail: Callable[[], str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                extra = f"\n{detail()}" if detail is not None else ""
                raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
            self.executor.spin_once(timeout_sec=0.05)

    def count(self, topic: str) -> int:
        return len(self.received[topic])

    def matched_totals(self) -> dict[str, int]:
        """Cumulative matched counts (publishers' readers, subscriptions' writers)."""
        out = {f"pub:{t}": i.total_count for t, i in self.pub_matched.items()}
        out.update({f"sub:{t}": i.total_count for t, i in self.sub_matched.items()})
        return out

    def wait_matched(self, answer_topics: tuple[str, ...], since: dict[str, int] | None = None,
                     timeout: float = 120.0, detail: Callable[[], str] | None = None) -> None:
        """Until every input publisher has a matched reader and every ``answer_topics``
        subscription a matched writer -- new ones (cumulative count above ``since``) when given,
        e.g. after a respawn, while the dead process's endpoints may still count as matched."""
        since = since or {}

        def ok(store: dict, topic: str, key: str) -> bool:
            info = store.get(topic)
            return (info is not None and info.current_count > 0
                    and info.total_count > since.get(key, 0))

        def matched() -> bool:
            return (all(ok(self.pub_matched, t, f"pub:{t}") for t in self.pubs)
                    and all(ok(self.sub_matched, t, f"sub:{t}") for t in answer_topics))
        self.spin_until(matched, timeout, "the node's readers and writers to match ours",
                        detail=lambda: f"matched: {self.matched_totals()} (since {since})"
                                       + (f"\n{detail()}" if detail else ""))

    # -- feeding ---------------------------------------------------------------------------
    def _publish(self, topic: str, raw: bytes, restamp: bool) -> tuple[bytes, tuple[int, int]]:
        """Publish one bag message; returns the bytes sent and their header stamp."""
        from rclpy.serialization import deserialize_message, serialize_message
        msg = deserialize_message(raw, self.classes[topic])
        if restamp:
            # a live driver stamps with "now": keeps actuation's max-age guard meaningful
            msg.header.stamp = self.node.get_clock().now().to_msg()
            raw = serialize_message(msg)
        self.pubs[topic].publish(raw)   # CDR bytes, as the bag (or the driver) has them
        self.published[topic] += 1
        return raw, self.stamp_of(msg)

    def feed(self, answer_topic: str, triggers: int | None = None, restamp: bool = True,
             only: tuple[str, ...] | None = None, timeout: float = 120.0,
             resend_after: float = 10.0, detail: Callable[[], str] | None = None) -> int:
        """Publish the bag from the cursor, in order, until ``triggers`` trigger messages (None:
        to the end of the bag) have been sent, waiting after each trigger for its answer on
        ``answer_topic``. ``only``: triggers to send (others skipped, context still sent).
        With ``restamp`` the bag wraps around. Returns the number of triggers sent."""
        only = only or self.triggers
        sent = 0
        while triggers is None or sent < triggers:
            if self.cursor >= len(self.messages):
                if triggers is None or not restamp:
                    break
                self.cursor = 0   # raw stamps would run backwards: wrap only when restamping
            topic, raw = self.messages[self.cursor]
            self.cursor += 1
            if topic in self.triggers and topic not in only:
                continue
            raw, stamp = self._publish(topic, raw, restamp)
            if topic not in self.triggers:
                self.executor.spin_once(timeout_sec=0.0)
                continue
            sent += 1
            self.sent_stamps.append(stamp)
            self._await_answer(answer_topic, topic, raw, stamp, timeout, resend_after, detail)
        return sent

    def _await_answer(self, answer_topic: str, topic: str, raw: bytes, stamp: tuple[int, int],
                      timeout: float, resend_after: float,
                      detail: Callable[[], str] | None) -> None:
        deadline = time.monotonic() + timeout
        resend_at = time.monotonic() + resend_after
        seen = len(self.received[answer_topic])
        while True:
            # only the answers that arrived since the last look need checking
            if any(self.stamp_of(m) == stamp for m in self.received[answer_topic][seen:]):
                return
            seen = len(self.received[answer_topic])
            now = time.monotonic()
            if now > deadline:
                extra = f"\n{detail()}" if detail is not None else ""
                raise AssertionError(f"timed out after {timeout} s waiting for the answer to "
                                     f"{topic} stamped {stamp} on {answer_topic} "
                                     f"(resent {self.resent} times in all){extra}")
            if now > resend_at:
                self.pubs[topic].publish(raw)
                self.resent += 1
                resend_at = now + resend_after
            self.executor.spin_once(timeout_sec=0.05)
