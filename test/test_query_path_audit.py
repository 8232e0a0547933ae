"""The query path does no file I/O and no hashing: the worker thread (``capsule_worker``) that
answers the demo bag opens no file and creates no hash object, while persistence, verify mode
and a file tier are all enabled and busy on other threads.

The pipeline runs with its real worker thread in a child process, which records, per thread,
every ``open`` audit event (``sys.addaudithook``: builtins.open, os.open, pathlib reads) and every
hash object made through ``hashlib`` (it has no audit event, so the child wraps its
constructors and records the calling thread and the capsule_ros frames on the stack). The
other threads must have written capsule files and hashed, so the hook demonstrably sees the
kind of work the worker must not do.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import capsule_ros

REPO = Path(__file__).resolve().parents[1]
PKG_ROOT = str(Path(capsule_ros.__file__).resolve().parent.parent)

CHILD = r"""
import hashlib, json, sys, threading, time
from pathlib import Path

out, params_file, bag = sys.argv[1], sys.argv[2], sys.argv[3]
events = []

def where():
    f, frames = sys._getframe(2), []
    while f is not None and len(frames) < 12:
        name = f.f_code.co_filename
        if "capsule_ros" in name:
            frames.append(f"{Path(name).name}:{f.f_code.co_name}")
        f = f.f_back
    return frames

def hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        events.append({"thread": threading.current_thread().name, "kind": "open",
                       "path": str(args[0]), "mode": str(args[1]), "flags": args[2],
                       "where": where()})

def wrap(name, fn):
    def made(*a, **k):
        events.append({"thread": threading.current_thread().name, "kind": "hash",
                       "algorithm": name, "where": where()})
        return fn(*a, **k)
    return made

for name in ("new", "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "blake2b",
             "blake2s", "sha3_256", "sha3_512"):
    setattr(hashlib, name, wrap(name, getattr(hashlib, name)))

import torch
torch.set_num_threads(1)
from capsule_ros.config import from_params, yaml_params
from capsule_ros.ros.bag_io import read_messages
from capsule_ros.runtime.build import build_pipeline
from capsule_ros.runtime.outcome import Answer, Failure

params = yaml_params(params_file)
params["capsules"].update({
    "directory": str(Path(out) / "caps"), "persist_on_commit": True, "verify_every": 4,
    # small device and host budgets: capsules move to the file tier
    "device_budget_mb": 2.0, "host_budget_mb": 0.5, "file_budget_mb": 256.0})
params["model"]["threads"] = 1
pipeline = build_pipeline(from_params(params), node_name="/audit/capsule_node")
by_topic = {spec.topic: name for name, spec in pipeline.config.inputs.items()}
messages = [(by_topic[m.topic], m.msg, m.timestamp_ns) for m in read_messages(bag)
            if m.topic in by_topic]

outcomes, done = [], threading.Condition()
def publish(outcome):
    with done:
        outcomes.append(outcome)
        done.notify_all()

sys.addaudithook(hook)
pipeline.start(publish, lambda: 0)
triggers = 0
for input_name, msg, stamp in messages:
    n = len(pipeline.triggered_by(input_name))
    pipeline.on_message(input_name, msg, stamp)
    triggers += n
    with done:   # each trigger answered before the next message: nothing is superseded
        done.wait_for(lambda: sum(isinstance(o, (Answer, Failure)) and o.request_id > 0
                                  for o in outcomes) >= triggers, timeout=120)
deadline = time.monotonic() + 120   # the worker's idle work (verification slices) finishes
while pipeline.engine.counters.get("verifies", 0) == 0 or getattr(
        pipeline.engine, "verifications_due", 0):
    if time.monotonic() > deadline:
        break
    time.sleep(0.02)
pipeline.scheduler.wait_idle(60)
flushed = pipeline.persister.flush(60)
stats = {"persist": {k: v for k, v in pipeline.persister.stats().items() if k != "errors"},
         "verifies": pipeline.engine.counters.get("verifies", 0),
         "tiers": pipeline.engine.store.stats()["counters"],
         "tier_dir": str(pipeline.dirs.tiers), "streams_dir": str(pipeline.dirs.streams)}
pipeline.close()
answers = [o for o in outcomes if isinstance(o, Answer)]
print(json.dumps({"triggers": triggers, "answers": len(answers),
                  "failures": [f"{o.code.name}: {o.text}" for o in outcomes if isinstance(o, Failure)],
                  "flushed": flushed, "stats": stats, "events": events}))
"""


@pytest.fixture(scope="module")
def audit(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("audit")
    env = dict(os.environ, PYTHONPATH=PKG_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), str(REPO / "config" / "default.yaml"),
                           str(REPO / "test" / "data" / "demo_bag")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _on(events: list[dict], thread: str) -> list[dict]:
    return [e for e in events if e["thread"] == thread]


def test_the_bag_is_answered_with_everything_enabled(audit):
    assert audit["triggers"] == 40 and audit["answers"] == audit["triggers"], audit["failures"]
    st = audit["stats"]
    assert audit["flushed"] and st["persist"]["saved"] >= 2 and st["persist"]["failed"] == 0
    assert st["verifies"] >= 1                       # verify mode ran
    assert any(path.endswith("file") for path in st["tiers"]["moves_by_path"]), st["tiers"]


def test_other_threads_wrote_and_hashed(audit):
    """The hook sees file writes and hashing where they belong: the persister's thread."""
    persist = _on(audit["events"], "capsule-persist")
    streams = audit["stats"]["streams_dir"]
    writes = [e for e in persist if e["kind"] == "open" and e["path"].startswith(streams)
              and e["flags"] & (os.O_WRONLY | os.O_RDWR)]
    assert writes, "no capsule file opened for writing by the persister"
    assert any(e["kind"] == "hash" and e["algorithm"] == "sha256" for e in persist)


def test_the_worker_does_no_file_io_and_no_hashing(audit):
    worker = _on(audit["events"], "capsule_worker")
    assert worker == [], json.dumps(worker[:5], indent=1)
    # the file tier was busy meanwhile: its moves ran on its own I/O thread
    tier_io = _on(audit["events"], "capsule-tier-io")
    assert any(e["kind"] == "open" and e["path"].startswith(audit["stats"]["tier_dir"])
               for e in tier_io)
