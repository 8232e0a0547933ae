"""Crash safety of capsule files: a save killed (SIGKILL) at any step leaves the previous file
loadable and intact (before the rename) or the new one whole (after); never a torn file, and a
stale temp file does not break a later save or load.

The subprocess imports only ``capsule_ros.capsule`` and saves a tiny synthetic capsule, so each
one starts fast.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import capsule_ros
from capsule_ros.capsule import CapsuleError
from capsule_ros.capsule import files

# Shared by the parent (exec) and the child (python -c): a small capsule, fully determined by v.
BUILD = r"""
import torch
from capsule_ros.capsule import (BufferSpec, Fingerprint, JournalEntry, Kind, LiveState,
                                 StateLayout, commit)
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
    first = commit(live, fingerprint=FP, position=5, meta={"v": v, "position": 5},
                   journal=(JournalEntry(torch.randn(5, 8, generator=g), "cam"),))
    for region in live.regions.values():
        region.copy_(torch.randn(region.shape, generator=g).to(region.dtype))
    return commit(live, fingerprint=FP, position=9 + v, meta={"v": v, "position": 9 + v},
                  meta_tensors={"rng": torch.arange(8, dtype=torch.uint8) * v},
                  journal=first.journal + (JournalEntry(torch.randn(4 + v, 8, generator=g), "cam"),),
                  parent=first)
"""
ns: dict = {}
exec(BUILD, ns)
LAYOUT, FP, build = ns["LAYOUT"], ns["FP"], ns["build"]
PKG_ROOT = str(Path(capsule_ros.__file__).resolve().parent.parent)


def digest(c) -> dict:
    h = lambda t: (str(t.dtype), tuple(t.shape), hashlib.sha256(  # noqa: E731
        t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
    return {"position": c.position, "fp": c.fingerprint.to_dict(), "meta": dict(c.meta),
            "kv": {k: h(c.kv_rows(k)) for k in c.kv[0].rows},
            "state": {k: h(t) for k, t in c.state.items()},
            "meta_tensors": {k: h(t) for k, t in c.meta_tensors.items()},
            "journal": [(e.source, h(e.embeds)) for e in c.journal]}


def child(directory: Path, v: int, crash_at: str | None) -> subprocess.Popen:
    """A fresh interpreter that saves build(v) as 'cam' in ``directory``, killed at ``crash_at``."""
    code = BUILD + (f"\nfrom capsule_ros.capsule.files import save_capsule\n"
                    f"save_capsule(build({v}), {str(directory)!r}, 'cam', LAYOUT)\n")
    env = dict(os.environ, PYTHONPATH=PKG_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(files.CRASH_ENV, None)
    if crash_at:
        env[files.CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_build_is_deterministic_and_distinct():
    assert digest(build(1)) == digest(build(1)) != digest(build(2))


def test_killed_save_leaves_old_or_new(tmp_path):
    """One child per crash point, run side by side (each pays a torch import)."""
    v1, v2, v3 = digest(build(1)), digest(build(2)), digest(build(3))
    runs = {}
    for point in files.CRASH_POINTS:
        d = tmp_path / point
        files.save_capsule(build(1), d, "cam", LAYOUT)
        runs[point] = (d, child(d, 2, point))
    for point, (d, proc) in runs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -9, (point, err.decode()[-2000:])
        got = digest(files.load_capsule((d, "cam"), FP, LAYOUT))
        before_rename = files.CRASH_POINTS.index(point) < files.CRASH_POINTS.index("renamed")
        assert got == (v1 if before_rename else v2), point
        assert len(files.stale_temps(d, "cam")) == (1 if before_rename else 0), point
        assert files.list_capsules(d) == ["cam"], point          # temp files are not capsules
        # a later save of the name cleans up and wins; a load sees it whole
        files.save_capsule(build(3), d, "cam", LAYOUT)
        assert files.stale_temps(d, "cam") == [], point
        assert digest(files.load_capsule(d / "cam.capsule.safetensors", FP, LAYOUT)) == v3, point


def test_stale_temp_alone_is_not_a_capsule(tmp_path):
    """What a crash during the first save of a name leaves: only a temp file."""
    (tmp_path / ".cam.capsule.safetensors.123.0.tmp").write_bytes(b"partial")
    with pytest.raises(CapsuleError, match="not found"):
        files.load_capsule((tmp_path, "cam"), FP, LAYOUT)
    assert files.list_capsules(tmp_path) == []
    files.save_capsule(build(2), tmp_path, "cam", LAYOUT)
    assert files.stale_temps(tmp_path, "cam") == []
    assert digest(files.load_capsule((tmp_path, "cam"), FP, LAYOUT)) == digest(build(2))


def test_save_without_crash_hook_is_plain(tmp_path, monkeypatch):
    monkeypatch.setenv(files.CRASH_ENV, "not-a-point")
    path = files.save_capsule(build(2), tmp_path, "cam", LAYOUT)
    assert path == tmp_path / "cam.capsule.safetensors"
    assert digest(files.load_capsule(path, FP, LAYOUT)) == digest(build(2))
