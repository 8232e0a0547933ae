"""Crash and restart of capsule files, with faults injected from the test side only.

* A child process is killed (SIGKILL, by itself, from a patched step) after each step of a user
  save (``files.save_capsule``) and of a persist (``Persister``, its background writer), and in
  the middle of writing the temp file: after "restart" every file is the previous or the new
  capsule, whole; temp files of the dead writer are cleaned at start; user snapshots in
  ``saved/`` are never touched by persistence.
* At most ``RANDOM_KILLS`` random kills of a child that races user saves and persistence of one
  stream: every file found afterwards is whole (counts printed).
* Disk full: ``RLIMIT_FSIZE`` in a child: a ``CapsuleWriteError``, the previous file intact, no
  temp file left.
* A user save racing persistence of the same name in one directory (the case that crashed the
  node: each save used to delete the other's temp file): no error, the file whole.

Children import only ``capsule_ros.capsule`` and save a tiny synthetic capsule, so each one
starts fast.
"""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import capsule_ros
from capsule_ros.capsule import CapsuleError, CapsuleNotFound, files
from capsule_ros.capsule.persist import Persister

# Shared by the parent (exec) and the children (python -c): a small capsule, fully determined by v.
BUILD = r"""
import torch
from capsule_ros.capsule import (BufferSpec, Fingerprint, JournalEntry, Kind, LiveState,
                                 StateLayout, snapshot)
LAYOUT = StateLayout((BufferSpec("L0.k", Kind.KV, torch.float32, (1, 2, 32, 4), seq_axis=2),
                      BufferSpec("L0.v", Kind.KV, torch.float32, (1, 2, 32, 4), seq_axis=2),
                      BufferSpec("L1.conv0", Kind.CONV, torch.bfloat16, (1, 8, 3)),
                      BufferSpec("L1.rec0", Kind.RECURRENT, torch.float32, (1, 2, 8, 8))), 32)
FP = Fingerprint(weights="w", dtype="float32", layout=LAYOUT.digest(), device="cpu", versions="t")

def build(v):
    live = LiveState(LAYOUT)
    g = torch.Generator().manual_seed(v)
    for region in live.regions.values():
        region.copy_(torch.randn(region.shape, generator=g).to(region.dtype))
    first = snapshot(live, fingerprint=FP, position=5, meta={"v": v, "position": 5},
                     journal=(JournalEntry(torch.randn(5, 8, generator=g), "cam"),))
    for region in live.regions.values():
        region.copy_(torch.randn(region.shape, generator=g).to(region.dtype))
    return snapshot(live, fingerprint=FP, position=9 + v, meta={"v": v, "position": 9 + v},
                    meta_tensors={"rng": torch.arange(8, dtype=torch.uint8) * v},
                    journal=first.journal + (JournalEntry(torch.randn(4 + v, 8, generator=g), "cam"),),
                    parent=first)
"""
# Patches a step of a save so that the process SIGKILLs itself after it ("mid" = halfway
# through writing the temp file).
KILL_AT = r"""
import os, signal
from capsule_ros.capsule import files

def kill_after(step):
    if step == "mid":
        def half(tmp, data, pause=None):
            files.__dict__["_orig_write"](tmp, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        files._orig_write = files._write_tmp
        files._write_tmp = half
        return
    orig = getattr(files, step)
    def wrapped(*a):
        orig(*a)
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(files, step, wrapped)
"""
ns: dict = {}
exec(BUILD, ns)
LAYOUT, FP, build = ns["LAYOUT"], ns["FP"], ns["build"]
PKG_ROOT = str(Path(capsule_ros.__file__).resolve().parent.parent)
STEPS = ("mid", *files.SAVE_STEPS)
RANDOM_KILLS = 6
COUNTS = {"kills": 0, "file_checks": 0, "torn": 0}


def digest(c) -> dict:
    h = lambda t: (str(t.dtype), tuple(t.shape), hashlib.sha256(  # noqa: E731
        t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
    return {"position": c.position, "fp": c.fingerprint.to_dict(), "meta": dict(c.meta),
            "kv": {k: h(c.kv_rows(k)) for k in c.kv[0].rows},
            "state": {k: h(t) for k, t in c.state.items()},
            "meta_tensors": {k: h(t) for k, t in c.meta_tensors.items()},
            "journal": [(e.source, h(e.embeds)) for e in c.journal]}


V = {v: digest(build(v)) for v in (1, 2, 3)}


def spawn(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=PKG_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", BUILD + KILL_AT + code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def check(path: Path, allowed: tuple[int, ...]) -> int:
    """The file at ``path`` loads whole and is one of the ``allowed`` capsules; returns which."""
    COUNTS["file_checks"] += 1
    try:
        got = digest(files.load_capsule(path, FP, LAYOUT))
    except CapsuleError:
        COUNTS["torn"] += 1
        raise
    which = [v for v in allowed if V[v] == got]
    assert which, f"{path} holds none of {allowed}"
    return which[0]


def test_build_is_deterministic_and_distinct():
    assert digest(build(1)) == digest(build(1)) != digest(build(2))


def test_user_save_killed_at_each_step_leaves_old_or_new(tmp_path):
    """One child per step, run side by side (each pays a torch import)."""
    runs = {}
    for step in STEPS:
        d = tmp_path / step
        files.save_capsule(build(1), d, "cam", LAYOUT)
        code = f"\nkill_after({step!r})\nfiles.save_capsule(build(2), {str(d)!r}, 'cam', LAYOUT)\n"
        runs[step] = (d, spawn(code))
    for step, (d, proc) in runs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -9, (step, err.decode()[-2000:])
        COUNTS["kills"] += 1
        renamed = STEPS.index(step) > STEPS.index("_fsync_file")
        assert check(d / "cam.capsule.safetensors", (1, 2)) == (2 if renamed else 1), step
        assert files.list_capsules(d) == ["cam"], step          # temp files are not capsules
        assert len(files.stale_temps(d, "cam")) == (0 if renamed else 1), step
        # "restart": the dead writer's temp file is cleaned; a later save wins, whole
        files.clean_stale_temps(d)
        assert files.stale_temps(d, "cam") == [], step
        files.save_capsule(build(3), d, "cam", LAYOUT)
        assert check(d / "cam.capsule.safetensors", (3,)) == 3, step


def test_persist_killed_at_each_step_restart_reloads_last_complete_boundary(tmp_path):
    """A persister writes two streams while the child dies after a step of its first write;
    a user snapshot sits in ``saved/``. After restart both streams reload whole (old or new),
    and the snapshot is untouched."""
    runs = {}
    for step in STEPS:
        root = tmp_path / step
        streams, saved = root / "streams", root / "saved"
        for name in ("front", "wrist"):
            files.save_capsule(build(1), streams, name, LAYOUT)
        files.save_capsule(build(3), saved, "front", LAYOUT)   # a user snapshot named like a stream
        code = (f"\nfrom capsule_ros.capsule.persist import Persister\nkill_after({step!r})\n"
                f"p = Persister({str(streams)!r}, LAYOUT)\n"
                "p.submit('front', build(2)); p.submit('wrist', build(2)); p.flush(60)\n")
        runs[step] = (root, spawn(code))
    for step, (root, proc) in runs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -9, (step, err.decode()[-2000:])
        COUNTS["kills"] += 1
        restarted = Persister(root / "streams", LAYOUT)   # cleans the dead writer's temp file
        got = restarted.load_all(FP, ["front", "wrist"])
        restarted.close()
        assert restarted.refused == {} and sorted(got) == ["front", "wrist"], step
        assert files.stale_temps(root / "streams", "front") == [], step
        for name in ("front", "wrist"):
            check(root / "streams" / f"{name}.capsule.safetensors", (1, 2))
        assert check(root / "saved" / "front.capsule.safetensors", (3,)) == 3, step


def test_random_kills_while_user_save_races_persistence(tmp_path):
    """A child saves the same stream to ``saved/`` (user) and ``streams/`` (persist) in a loop,
    both into the same name too; killed at a random moment. Every file left is whole."""
    rng = random.Random(1234)
    code = ("\nimport sys\nfrom capsule_ros.capsule import files\n"
            "from capsule_ros.capsule.persist import Persister\n"
            "root = sys.argv[1]\np = Persister(root + '/streams', LAYOUT)\n"
            "caps = [build(1), build(2)]\nprint('ready', flush=True)\ni = 0\n"
            "while True:\n"
            "    p.submit('cam', caps[i % 2])\n"
            "    files.save_capsule(caps[(i + 1) % 2], root + '/saved', 'cam', LAYOUT)\n"
            "    files.save_capsule(caps[i % 2], root + '/streams', 'cam', LAYOUT)\n"
            "    i += 1\n")
    for trial in range(RANDOM_KILLS):
        root = tmp_path / str(trial)
        for sub in ("streams", "saved"):
            files.save_capsule(build(1), root / sub, "cam", LAYOUT)
        env = dict(os.environ, PYTHONPATH=PKG_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-c", BUILD + code, str(root)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 0.3))   # where it dies is random; what is checked is not
        proc.kill()
        proc.wait(timeout=60)
        COUNTS["kills"] += 1
        for sub in ("streams", "saved"):
            files.clean_stale_temps(root / sub)
            assert files.list_capsules(root / sub) == ["cam"]
            check(root / sub / "cam.capsule.safetensors", (1, 2))
            assert files.stale_temps(root / sub, "cam") == []
    print(f"crash/restart: {COUNTS['kills']} kills, {COUNTS['file_checks']} file checks, "
          f"{COUNTS['torn']} torn")
    assert COUNTS["torn"] == 0


def test_disk_full_is_a_coded_error_and_the_previous_file_stays(tmp_path):
    files.save_capsule(build(1), tmp_path, "cam", LAYOUT)
    size = (tmp_path / "cam.capsule.safetensors").stat().st_size
    code = (f"\nimport resource, signal\nfrom capsule_ros.capsule import CapsuleWriteError\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))\n"
            "try:\n"
            f"    files.save_capsule(build(2), {str(tmp_path)!r}, 'cam', LAYOUT)\n"
            "except CapsuleWriteError as e:\n"
            "    print('refused', e.reason, e)\n")
    proc = spawn(code)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().startswith("refused write_failed"), out.decode()
    assert "File too large" in out.decode() and "previous file is intact" in out.decode()
    assert check(tmp_path / "cam.capsule.safetensors", (1,)) == 1
    assert files.stale_temps(tmp_path, "cam") == []


def test_user_save_racing_persistence_of_the_same_name(tmp_path):
    """Two writers of one name in one directory (before saved/ and streams/ were split, the
    first one to clean 'stale' temp files deleted the other's and crashed it)."""
    errors: list[BaseException] = []
    caps = [build(1), build(2)]
    with Persister(tmp_path, LAYOUT) as p:
        def user() -> None:
            try:
                for i in range(40):
                    files.save_capsule(caps[i % 2], tmp_path, "cam", LAYOUT)
            except BaseException as e:  # noqa: BLE001 - any failure is the finding
                errors.append(e)
        t = threading.Thread(target=user)
        t.start()
        for i in range(40):
            p.submit("cam", caps[(i + 1) % 2])
            p.flush(60)
        t.join(120)
        stats = p.stats()
    assert errors == [] and stats["failed"] == 0 and stats["saved"] >= 1
    check(tmp_path / "cam.capsule.safetensors", (1, 2))
    assert files.stale_temps(tmp_path, "cam") == []


def test_stale_temp_alone_is_not_a_capsule(tmp_path):
    """What a crash during the first save of a name leaves: only a temp file."""
    (tmp_path / ".cam.capsule.safetensors.123.0.tmp").write_bytes(b"partial")
    with pytest.raises(CapsuleNotFound, match="not found"):
        files.load_capsule((tmp_path, "cam"), FP, LAYOUT)
    assert files.list_capsules(tmp_path) == []
    files.save_capsule(build(2), tmp_path, "cam", LAYOUT)
    assert check(tmp_path / "cam.capsule.safetensors", (2,)) == 2
