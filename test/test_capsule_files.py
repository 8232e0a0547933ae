"""Capsule files: byte-exact round trips (host tier, file tier) of a real model's capsule, exact
continuation after loading into dirtied live buffers, refusal of corrupted, truncated, foreign,
wrong-version and badly named files with nothing changed, and the persister."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsule_ros.capsule import CapsuleError, CapsuleNotFound
from capsule_ros.capsule import files
from capsule_ros.capsule.persist import Persister
from capsule_ros.capsule.quiet import QuietGate
from capsule_ros.capsule.tiers import copy_capsule
from capsule_ros.models.hybrid import HybridModel, ModelSpec
from capsule_ros.runtime.engine import Engine

CONFIG = str(Path(__file__).resolve().parent.parent / "config/models/default_qwen3_5.json")


def h(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    return (str(t.dtype), tuple(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest())


def digest(c) -> dict:
    return {"position": c.position, "fp": c.fingerprint.to_dict(), "meta": json.dumps(dict(c.meta)),
            "kv": {k: h(c.kv_rows(k)) for k in (c.kv[0].rows if c.kv else ())},
            "state": {k: h(t) for k, t in c.state.items()},
            "meta_tensors": {k: h(t) for k, t in c.meta_tensors.items()},
            "journal": [(e.source, h(e.embeds)) for e in c.journal]}


def store_digest(engine) -> dict:
    """Every tensor of every capsule the store holds (sha256), and the slots' shape."""
    s = engine.store
    return {"streams": s.list(),
            "slots": {n: (s.position(n), len(s.slot(n).held_history), s.slot(n).commits) for n in s.list()},
            "capsules": sorted((c.id, json.dumps(digest(c), sort_keys=True)) for c in s.capsules())}


@pytest.fixture(scope="module")
def setup():
    model = HybridModel.load(ModelSpec(config_file=CONFIG, max_len=256))
    engine = Engine(model, chunk_size=16, full_journal=True)
    engine.meta_tensors["rng"] = torch.Generator().manual_seed(7).get_state()
    engine.add_stream("a")
    g = torch.Generator().manual_seed(3)
    for n in (16, 9, 7):   # three commits: the boundary is a chain of delta segments
        engine.query("a", torch.randn(n, model.hidden_size, generator=g), act=lambda x: x, source=f"obs{n}")
        engine.commit()
    capsule = engine.boundary("a")
    assert len(capsule.kv) == 3 and capsule.position == 32 and len(capsule.journal) == 3
    return model, engine, capsule


def test_round_trip_host_and_file_tier_byte_exact(setup, tmp_path):
    model, engine, capsule = setup
    want = digest(capsule)
    host = copy_capsule(capsule, torch.device("cpu"))
    assert digest(host) == want and len(host.kv) == 1 and host.id == capsule.id
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(host.state.values(), capsule.state.values()))
    path = files.save_capsule(capsule, tmp_path, "a", model.live.layout)
    assert path == tmp_path / "a.capsule.safetensors" and path.stat().st_size > capsule.nbytes
    loaded = files.load_capsule((tmp_path, "a"), model.fingerprint, model.live.layout)
    assert digest(loaded) == want
    assert dict(loaded.meta) == dict(capsule.meta) and loaded.fingerprint == capsule.fingerprint
    header = files.read_header(path)
    assert header["version"] == files.FORMAT_VERSION and header["position"] == 32
    assert header["layout"] == model.live.layout.describe()
    assert header["journal"] == [{"source": "obs16"}, {"source": "obs9"}, {"source": "obs7"}]
    assert set(header["tensors"]) == {"kv.float32", "state.float32", "meta.rng",
                                      "journal.0", "journal.1", "journal.2"}
    # saving the loaded capsule again gives the same tensors, byte for byte
    again = files.save_capsule(loaded, tmp_path, "b", model.live.layout)
    assert files.read_header(again)["tensors"] == header["tensors"]


def test_continuation_after_load_into_dirty_buffers(setup, tmp_path):
    model, engine, capsule = setup
    files.save_capsule(capsule, tmp_path, "a", model.live.layout)
    x = torch.randn(8, model.hidden_size, generator=torch.Generator().manual_seed(11))
    engine.add_stream("orig", base=capsule)
    ref = engine.query("orig", x, act=lambda hid: hid.clone())
    engine.commit()
    ref_boundary = engine.boundary("orig")

    loaded = files.load_capsule((tmp_path, "a"), model.fingerprint, model.live.layout)
    engine.add_stream("reloaded", base=loaded)
    engine.live.scrub()
    out = engine.query("reloaded", x, act=lambda hid: hid.clone())
    engine.commit()
    assert out.restored and torch.equal(out.output, ref.output)
    assert digest(engine.boundary("reloaded"))["kv"] == digest(ref_boundary)["kv"]
    assert digest(engine.boundary("reloaded"))["state"] == digest(ref_boundary)["state"]
    for s in ("orig", "reloaded"):
        engine.drop(s)


def load_into(engine, stream: str, path, fp, layout):
    """What the pipeline's ``load`` does: read and verify the file, then install it."""
    capsule = files.load_capsule(path, fp, layout)
    engine.install(stream, capsule)
    return capsule


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a capsule file with its JSON header edited (and its header checksum redone)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta[files.HEADER_KEY])
    edit(header)
    text = json.dumps(header)
    meta[files.HEADER_KEY] = text
    meta[files.HEADER_SHA_KEY] = hashlib.sha256(text.encode()).hexdigest()
    save_file(tensors, str(dst), metadata=meta)


def test_bad_files_refused_and_nothing_changes(setup, tmp_path):
    model, engine, capsule = setup
    layout, fp = model.live.layout, model.fingerprint
    good = files.save_capsule(capsule, tmp_path, "good", layout)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])

    def variant(name: str, blob: bytes) -> Path:
        p = tmp_path / f"{name}.capsule.safetensors"
        p.write_bytes(blob)
        return p

    flipped = bytearray(data)
    flipped[8 + n + len(data[8 + n:]) // 2] ^= 0x01            # one bit in the payload
    header_flip = bytearray(data)
    pos = data.index(b'"position\\": 32')                       # inside the JSON header text
    header_flip[pos + len(b'"position\\": 3')] = ord("1")        # 32 -> 31
    cases = {
        variant("flipped", bytes(flipped)): "checksum mismatch",
        variant("headerflip", bytes(header_flip)): "header checksum mismatch",
        variant("truncated", data[: len(data) * 2 // 3]): "truncated",
        variant("stub", data[:5]): "truncated",
        variant("trailing", data + b"\0"): "trailing",
    }
    _rewrite(good, tmp_path / "v9.capsule.safetensors", lambda hd: hd.update(version=9))
    cases[tmp_path / "v9.capsule.safetensors"] = "format version 9 not supported"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.capsule.safetensors"))
    cases[tmp_path / "plain.capsule.safetensors"] = "not a capsule_ros capsule file"

    other = HybridModel.load(ModelSpec(config_file=CONFIG, max_len=256, seed=1))
    assert other.fingerprint.diff(fp) == ["weights"]

    engine.add_stream("b", base=capsule)
    before = store_digest(engine)
    live_before = {k: h(r) for k, r in engine.live.regions.items()}
    for path, why in cases.items():
        with pytest.raises(CapsuleError, match=why):
            load_into(engine, "a", path, fp, layout)
        with pytest.raises(CapsuleError, match=why):
            load_into(engine, "new", path, fp, layout)
    with pytest.raises(CapsuleError, match="differs in weights"):
        load_into(engine, "a", good, other.fingerprint, other.live.layout)
    for bad in ("../x", "a/b", "..", "", ".hidden", "x" * 80):
        with pytest.raises(CapsuleError, match="invalid capsule name"):
            files.save_capsule(capsule, tmp_path, bad, layout)
        with pytest.raises(CapsuleError, match="invalid capsule name"):
            files.load_capsule((tmp_path, bad), fp, layout)
        with pytest.raises(CapsuleError, match="invalid capsule name"):
            load_into(engine, bad, good, fp, layout)
    with pytest.raises(CapsuleNotFound, match="not found"):
        load_into(engine, "a", tmp_path / "missing.capsule.safetensors", fp, layout)
    assert store_digest(engine) == before and "new" not in engine.store
    assert {k: h(r) for k, r in engine.live.regions.items()} == live_before
    assert not (tmp_path.parent / "x.capsule.safetensors").exists()
    # the good file still loads, through the store too
    assert digest(load_into(engine, "b", good, fp, layout)) == digest(capsule)
    # into a new stream: it starts at the loaded boundary, with no history and no base
    load_into(engine, "c", good, fp, layout)
    slot = engine.store.slot("c")
    assert len(slot.history) == 0 and slot.base is None
    assert digest(engine.store.current("c")) == digest(capsule)
    engine.drop("b")
    engine.drop("c")


def until(predicate, timeout: float = 30.0) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_save_in_slices_pauses_before_each_and_writes_the_same_bytes(setup, tmp_path, monkeypatch):
    model, engine, capsule = setup
    layout = model.live.layout
    plain = files.save_capsule(capsule, tmp_path / "plain", "a", layout).read_bytes()
    monkeypatch.setattr(files, "SLICE_BYTES", 1024)
    calls = []
    path = files.save_capsule(capsule, tmp_path / "sliced", "a", layout, pause=lambda: calls.append(1))
    assert path.read_bytes() == plain
    tensor_bytes = sum(t.nbytes for t in files.capsule_file_tensors(capsule).values())
    assert tensor_bytes > 8 * 1024
    # every 1 KiB of tensor data is hashed once and written once, each after a pause
    assert len(calls) >= 2 * tensor_bytes // 1024


def test_the_persister_holds_off_while_the_query_path_is_busy(setup, tmp_path):
    model, engine, capsule = setup
    layout, fp = model.live.layout, model.fingerprint
    gate = QuietGate()
    gate.busy()                                   # a query is in hand
    with Persister(tmp_path, layout, gate=gate, max_defer_s=600) as p:
        p.submit("a", capsule)
        assert until(lambda: gate.waiting() == 1)  # the writer waits before its first slice
        assert p.pending() == 1 and not (tmp_path / "a.capsule.safetensors").exists()
        gate.quiet()                              # the query is done
        assert p.flush(timeout=60)
        assert p.stats()["saved"] == 1
    got = Persister(tmp_path, layout).load_all(fp, ["a"])
    assert digest(got["a"]) == digest(capsule)
    assert gate.stats()["pauses"] >= 1 and gate.stats()["deadline_passes"] == 0


def test_a_persister_kept_waiting_past_its_deadline_writes_anyway(setup, tmp_path):
    model, engine, capsule = setup
    gate = QuietGate()
    gate.busy()                                   # queries never stop
    with Persister(tmp_path, model.live.layout, gate=gate, max_defer_s=0.0) as p:
        p.submit("a", capsule)
        assert p.flush(timeout=60)
        assert p.stats()["saved"] == 1 and p.stats()["failed"] == 0
    assert (tmp_path / "a.capsule.safetensors").exists()
    assert gate.stats()["deadline_passes"] >= 1


def test_persister_latest_wins_and_load_all(setup, tmp_path):
    model, engine, capsule = setup
    layout, fp = model.live.layout, model.fingerprint
    empty = engine.empty
    with Persister(tmp_path, layout) as p:
        for _ in range(3):
            p.submit("a", empty)
        p.submit("a", capsule)          # newest wins
        p.submit("e", empty)
        assert p.flush(timeout=60)
        st = p.stats()
        assert st["pending"] == 0 and st["failed"] == 0
        assert st["saved"] + st["superseded"] == st["submitted"] == 5
    (tmp_path / "junk.capsule.safetensors").write_bytes(b"\x00" * 40)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".a.capsule.safetensors.{int(dead.stdout)}.0.tmp"   # a crashed writer's
    stale.write_bytes(b"stale")
    live = tmp_path / f".a.capsule.safetensors.{os.getpid()}.99.tmp"       # a live writer's
    live.write_bytes(b"busy")
    loader = Persister(tmp_path, layout)
    got = loader.load_all(fp, ["a", "e", "junk", "never_saved"])
    loader.close()
    assert loader.cleaned == [stale] and not stale.exists() and live.exists()
    assert sorted(got) == ["a", "e"] and list(loader.refused) == ["junk"]
    assert digest(got["a"]) == digest(capsule) and digest(got["e"]) == digest(empty)
    assert "truncated" in loader.refused["junk"] or "corrupted" in loader.refused["junk"]
