"""The node as a robot stack drives it: `ros2 launch`, `ros2 lifecycle`, `ros2 param` and
`ros2 service` -- the real Jazzy tools (built from ../shared/third_party, see
scripts/tools_overlay.sh) -- against the node in its own process.

Harness and CI guards (timeouts, --no-daemon, process groups, unique namespace and domain, one
thread per node): test/rostools.py. Every check is on a state (`ros2 lifecycle get`), a counter
(answers received) or a log line; deadlines only bound a hang.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from capsule_ros.ros.launch_args import node_arguments
from rostools import Feeder, Proc, RosCli, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.cli, pytest.mark.timeout(600)]

ACTION_CHUNK = "capsule_ros/msg/ActionChunk"
STATUS = "capsule_ros/msg/Status"
TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
CAPSULE_OP = "capsule_ros/srv/CapsuleOp"
FRONT, WRIST = "/front_cam/image_raw", "/wrist_cam/image_raw"
JOINTS = [f"joint_{i}" for i in range(1, 8)]

#: what must not appear when a node exits cleanly: launch reports a non-zero exit as
#: "[ERROR] [capsule_node-1]: process has died", the node's own error logs carry [ERROR]
ERROR_LINE = re.compile(r"\[(ERROR|FATAL)\]|Traceback \(most recent call last\)|"
                        r"\w+(Error|Exception): ")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def params_file(tmp_path: Path, default_params: Path, name: str = "params.yaml",
                **overrides: Any) -> Path:
    """default.yaml with dotted overrides (``**{"model.dtype": "float99"}``), as a new file.
    model.threads: 1 -- one torch thread per node process on the 2-core CI machine."""
    doc = yaml.safe_load(default_params.read_text())
    (key,) = doc
    params = doc[key]["ros__parameters"]
    for dotted, value in {"model.threads": 1, **overrides}.items():
        *parents, leaf = dotted.split(".")
        d = params
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    out = tmp_path / name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def actuation_params(tmp_path: Path, default_params: Path) -> Path:
    """An actuation section as config/default.yaml's comment shows, off until set live; a wide
    max age: the guard's age check is not under test here and CI machines are slow."""
    return params_file(tmp_path, default_params, "actuation.yaml", **{
        "actuation.enabled": False, "actuation.stream": "front", "actuation.joint_names": JOINTS,
        "actuation.mode": "clamp", "actuation.max_age_ms": 60000.0})


@pytest.fixture
def make_feeder(ros_cli, demo_bag):
    made: list[Feeder] = []

    def make(*extra_answers: tuple[str, str]) -> Feeder:
        answers = {ros_cli.topic("actions"): ACTION_CHUNK, ros_cli.topic("status"): STATUS}
        answers.update(dict(extra_answers))
        feeder = Feeder(ros_cli, demo_bag, answers)
        made.append(feeder)
        return feeder
    yield make
    for feeder in made:
        feeder.close()


def detail(proc: Proc, feeder: Feeder | None = None):
    """What to print when a wait times out: statuses the node published, the launch log."""
    def text() -> str:
        out = ""
        if feeder is not None:
            statuses = feeder.received.get(next(t for t in feeder.received if t.endswith("/status")), [])
            out += "statuses: " + "; ".join(f"{s.stream}:{s.code}:{s.text}" for s in statuses[-10:])
            out += f"\npublished: {feeder.published}\n"
        return out + "launch log tail:\n" + proc.text()[-5000:]
    return text


def interrupt_and_check_clean_exit(proc: Proc) -> None:
    """Ctrl-C as a terminal sends it (SIGINT to the process group: launch and node): the node
    exits 0 ("process has finished cleanly") and nothing logs an error."""
    proc.signal_group(signal.SIGINT)
    rc = proc.wait(timeout=120)
    log = proc.text()
    assert rc == 0, f"ros2 launch exited {rc}:\n{log[-5000:]}"
    assert re.search(r"\[capsule_node-\d+\]: process has finished cleanly", log), log[-5000:]
    errors = [line for line in log.splitlines() if ERROR_LINE.search(line)]
    assert errors == [], "\n".join(errors)


def capsule_stats(cli: RosCli) -> dict[str, Any]:
    import json
    r = cli.call_service(cli.topic("capsule"), CAPSULE_OP, "{op: stats}")
    assert r["ok"] is True, r
    return json.loads(r["json"])


# ---------------------------------------------------------------------------------------------
# the launch file through ros2 launch (no node started)
# ---------------------------------------------------------------------------------------------

def test_launch_file_shows_its_arguments(ros_cli):
    out = ros_cli.ros2("launch", "capsule_ros", "capsule_ros.launch.py", "--show-args").stdout
    shown = dict(re.findall(r"'(\w+)':\n.*\n\s+\(default: '(.*)'\)", out))
    assert set(shown) == {"params_file", "namespace", "log_level", "use_sim_time", "autostart",
                          "respawn", "respawn_delay", "launch_prefix"}, out
    assert (shown["autostart"], shown["respawn"], shown["respawn_delay"], shown["launch_prefix"]) \
        == ("true", "false", "2.0", "")
    assert shown["params_file"].endswith("share/capsule_ros/config/default.yaml")


def test_launch_refuses_a_bad_argument_by_name(ros_cli):
    r = ros_cli.ros2("launch", "capsule_ros", "capsule_ros.launch.py", "respawn_delay:=soon",
                     f"namespace:={ros_cli.namespace}", check=False)
    assert r.returncode != 0, r
    assert "respawn_delay must be a number" in r.output, r
    assert "process started" not in r.output, r


# ---------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------

def test_launch_autostarts_and_answers_the_bag_from_best_effort_publishers(
        ros_cli, make_feeder, tmp_path, default_params):
    proc = ros_cli.launch(params_file=params_file(tmp_path, default_params))
    ros_cli.wait_state("active", proc=proc)
    feeder = make_feeder()
    actions = ros_cli.topic("actions")
    feeder.wait_matched((actions,), detail=detail(proc, feeder))
    sent = feeder.feed(actions, restamp=False, detail=detail(proc, feeder))   # the whole bag
    assert sent == len(set(feeder.sent_stamps)) == 40
    assert feeder.answered(actions) == set(feeder.sent_stamps)   # every trigger, by its stamp
    chunks = feeder.received[actions]
    assert 40 <= len(chunks) <= 40 + feeder.resent   # a resent trigger may be answered twice
    by_stream = {c.stream: set() for c in chunks}
    for c in chunks:
        by_stream[c.stream].add(Feeder.stamp_of(c))
    assert {s: len(v) for s, v in by_stream.items()} == {"front": 20, "wrist": 20}
    interrupt_and_check_clean_exit(proc)


def test_lifecycle_set_drives_the_node_and_keeps_capsules(ros_cli, make_feeder, tmp_path,
                                                          default_params):
    proc = ros_cli.launch(params_file=params_file(tmp_path, default_params), autostart=False)
    ros_cli.wait_state("unconfigured", proc=proc)

    r = ros_cli.lifecycle_set("configure")
    assert "Transitioning successful" in r.stdout, r
    assert ros_cli.lifecycle_state() == "inactive"
    r = ros_cli.lifecycle_set("activate")
    assert "Transitioning successful" in r.stdout, r
    assert ros_cli.lifecycle_state() == "active"

    feeder = make_feeder()
    actions = ros_cli.topic("actions")
    feeder.wait_matched((actions,), detail=detail(proc, feeder))
    assert feeder.feed(actions, triggers=4, detail=detail(proc, feeder)) == 4
    before = capsule_stats(ros_cli)["per_stream"]
    assert {s: v["position"] > 0 for s, v in before.items()} == {"front": True, "wrist": True}

    matched_before = feeder.matched_totals()
    r = ros_cli.lifecycle_set("deactivate")
    assert "Transitioning successful" in r.stdout, r
    assert ros_cli.lifecycle_state() == "inactive"
    r = ros_cli.lifecycle_set("activate")
    assert "Transitioning successful" in r.stdout, r
    assert ros_cli.lifecycle_state() == "active"

    listed = ros_cli.call_service(ros_cli.topic("capsule"), CAPSULE_OP, "{op: list}")
    assert listed["ok"] is True and sorted(listed["names"]) == ["front", "wrist"], listed
    after = capsule_stats(ros_cli)["per_stream"]
    assert {s: (v["position"], v["commits"]) for s, v in after.items()} == \
        {s: (v["position"], v["commits"]) for s, v in before.items()}

    # serving again, from the kept boundaries (positions grow, not restart); activate made new
    # input subscriptions: wait for those to match, not for the old ones' stale status
    feeder.wait_matched((), since={k: v for k, v in matched_before.items() if k.startswith("pub:")},
                        detail=detail(proc, feeder))
    assert feeder.feed(actions, triggers=2, detail=detail(proc, feeder)) == 2   # front, wrist
    assert len(feeder.answered(actions, feeder.sent_stamps[-2:])) == 2
    grown = capsule_stats(ros_cli)["per_stream"]
    assert {s: grown[s]["position"] > before[s]["position"] for s in before} == \
        {"front": True, "wrist": True}
    interrupt_and_check_clean_exit(proc)   # Ctrl-C of an idle, active node


def test_respawn_after_kill_9_comes_back_active_and_answers(ros_cli, make_feeder, tmp_path,
                                                             default_params):
    proc = ros_cli.launch(params_file=params_file(tmp_path, default_params), respawn=True,
                          respawn_delay=1.0)
    ros_cli.wait_state("active", proc=proc)
    feeder = make_feeder()
    actions = ros_cli.topic("actions")
    feeder.wait_matched((actions,), detail=detail(proc, feeder))
    assert feeder.feed(actions, triggers=2, detail=detail(proc, feeder)) == 2

    (old_pid,) = proc.node_pids()
    matched_before = feeder.matched_totals()
    os.kill(old_pid, signal.SIGKILL)
    new_pids = wait_for(lambda: [p for p in proc.node_pids() if p != old_pid], 120,
                        "launch to respawn the node", detail=detail(proc, feeder))
    assert len(new_pids) == 1
    ros_cli.wait_state("active", proc=proc)
    # the new process's readers/writers, not the dead one's lingering matches
    feeder.wait_matched((actions,), since=matched_before, detail=detail(proc, feeder))
    assert feeder.feed(actions, triggers=2, detail=detail(proc, feeder)) == 2
    assert len(feeder.answered(actions, feeder.sent_stamps[-2:])) == 2   # by the new process
    assert re.search(rf"process has died \[pid {old_pid}, exit code -9", proc.text())
    assert proc.running()


def test_param_describe_get_and_set_live_and_structural(ros_cli, make_feeder, tmp_path,
                                                        default_params):
    proc = ros_cli.launch(params_file=actuation_params(tmp_path, default_params))
    ros_cli.wait_state("active", proc=proc)

    described = ros_cli.param("describe", "model.dtype").stdout
    assert "Parameter name: model.dtype" in described and "Type: string" in described, described
    assert re.search(r"Description: \S", described), described
    assert ros_cli.param("get", "model.dtype").stdout.strip() == "String value is: float32"
    assert ros_cli.param("get", "actuation.enabled").stdout.strip() == "Boolean value is: False"

    trajectory = ros_cli.topic("joint_trajectory")
    feeder = make_feeder((trajectory, TRAJECTORY))
    actions = ros_cli.topic("actions")
    feeder.wait_matched((actions,), detail=detail(proc, feeder))
    assert feeder.feed(actions, triggers=2, only=(FRONT,), detail=detail(proc, feeder)) == 2
    off = set(feeder.sent_stamps)   # answered with actuation off

    r = ros_cli.param("set", "actuation.enabled", "true")
    assert "Set parameter successful" in r.stdout, r
    assert ros_cli.param("get", "actuation.enabled").stdout.strip() == "Boolean value is: True"
    feeder.wait_matched((actions, trajectory), detail=detail(proc, feeder))
    assert feeder.feed(actions, triggers=2, only=(FRONT,), detail=detail(proc, feeder)) == 2
    on = set(feeder.sent_stamps) - off
    feeder.spin_until(lambda: feeder.answered(trajectory, list(on)), 120,
                      "a JointTrajectory after actuation.enabled:=true", detail=detail(proc, feeder))
    # commands carry their trigger's stamp: none for a trigger answered while actuation was off
    assert {Feeder.stamp_of(t) for t in feeder.received[trajectory]} <= on
    command = feeder.received[trajectory][-1]
    assert list(command.joint_names) == JOINTS and len(command.points) > 0

    r = ros_cli.param("set", "model.dtype", "bfloat16")
    refusal = re.search(r"Setting parameter failed: (.+)", r.output)
    assert refusal and refusal.group(1).strip(), r   # refused, with a reason
    assert ros_cli.param("get", "model.dtype").stdout.strip() == "String value is: float32"
    assert ros_cli.lifecycle_state() == "active"
    interrupt_and_check_clean_exit(proc)


@pytest.mark.parametrize("override, named", [
    ({"model.dtype": "float99"}, "model.dtype"),
    ({"inputs.front_cam.expect_sise": [48, 64]}, "expect_sise"),
], ids=["bad_dtype", "typo_key"])
def test_invalid_params_file_fails_configure_and_the_node_stays_up(
        ros_cli, tmp_path, default_params, override, named):
    bad = params_file(tmp_path, default_params, "bad.yaml", **override)
    proc = ros_cli.launch(params_file=bad, autostart=False)
    ros_cli.wait_state("unconfigured", proc=proc)
    r = ros_cli.lifecycle_set("configure")
    assert "Transitioning failed" in r.output, r
    assert ros_cli.lifecycle_state() == "unconfigured"
    assert proc.node_pids() and proc.running()
    assert named in proc.text(), proc.text()[-5000:]


def test_invalid_params_with_autostart_leaves_the_node_unconfigured(ros_cli, tmp_path,
                                                                   default_params):
    bad = params_file(tmp_path, default_params, "bad.yaml", **{"model.dtype": "float99"})
    proc = ros_cli.launch(params_file=bad)
    # the configure attempt is over once its failure is logged; then the state must be
    # unconfigured and the process still up
    wait_for(lambda: "float99" in proc.text() or not proc.running(), 300,
             "the configure failure to be logged", detail=detail(proc))
    assert "model.dtype" in proc.text(), proc.text()[-5000:]
    ros_cli.wait_state("unconfigured", proc=proc)
    assert proc.node_pids()


def test_ctrl_c_while_configuring_exits_clean(ros_cli, tmp_path, default_params):
    """Ctrl-C while the node loads its model (autostart's configure): it still exits 0 with no
    error line. Sent once the node has logged its first line (rclpy is up, configure runs): the
    interpreter's own startup, before any project code, is no moment a node can handle."""
    proc = ros_cli.launch(params_file=params_file(tmp_path, default_params))
    wait_for(lambda: re.search(r"^\[capsule_node-\d+\] \[(INFO|WARN)\]", proc.text(), re.M)
             or not proc.running(), 300, "the node's first log line", interval=0.05,
             detail=detail(proc))
    interrupt_and_check_clean_exit(proc)


def test_node_alone_needs_no_tools_autostarts_and_exits_0_on_sigint(ros_cli, tmp_path,
                                                                    default_params):
    """`ros2 run`'s equivalent: the installed executable with node_arguments' command line and
    none of the tools overlay or the archive's diagnostic_updater on its paths (a robot without
    ros2launch): autostart brings it to active; SIGINT to the process, exit status 0."""
    args = node_arguments(params_file=str(params_file(tmp_path, default_params)),
                          namespace=ros_cli.namespace)
    bare = ros_cli.node_env_without_tools()
    for module in ("launch_ros", "ros2cli", "diagnostic_updater"):   # really not there
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], env=bare,
                               capture_output=True, timeout=60)
        assert b"No module named" in probe.stderr, f"{module} importable without the overlay"
    proc = ros_cli.run_node(args.cli_args())
    ros_cli.wait_state("active", proc=proc)
    proc.signal_group(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, proc.text()[-5000:]
    errors = [line for line in proc.text().splitlines() if ERROR_LINE.search(line)]
    assert errors == [], "\n".join(errors)
