"""Proofs that a capsule is the complete execution state, for every model family we ship.

For each family config (the default plus every ``config/models/tiny_*.json``; a config that
fails to load fails its tests, none is skipped):

* restore is byte-exact: after snapshot, scrub and restore, every live buffer's valid bytes
  (KV rows [0, position), all conv and recurrent state) and the metadata equal the capsule's;
* a greedy continuation after restore equals a cold run of the same history (the journal
  replayed from the empty state with the same chunking): tokens equal over 8 steps, logits within
  ``TOL`` (bit-exact in practice on CPU float32) -- after the live buffers were dirtied by
  another stream's queries, for two forks of one capsule, after rollback(k), after a rebase;
* negative controls, in the same test and on the same dirtied buffers: a KV-only restore, a
  restore that leaves the conv state dirty, and one that leaves the Python-side
  ``has_previous_state`` flags False all diverge, while the full restore on those same buffers
  does not. So the check is sensitive and every part of the capsule is load-bearing.

The cold reference never restores anything: ``engine.recompute`` writes the base (zeros) and
re-runs the journal through the model, then ``verify.greedy`` decodes straight on the model. As
that replay shares the append code under test, every cold reference is itself checked against
transformers' own one-shot forward over the same tokens (``transformers_reference``).
"""
from __future__ import annotations

import glob
import itertools
import warnings
from pathlib import Path

import pytest
import torch

from capsule_ros.capsule import capsule as capsule_ops
from capsule_ros.capsule.layout import Kind
from capsule_ros.models.hybrid import HybridModel, ModelSpec
from capsule_ros.runtime.engine import Engine
from capsule_ros.runtime.verify import compare_capsules, greedy, live_mismatches
from capsule_ros.status_codes import Code

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["config/models/default_qwen3_5.json"] + sorted(
    str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "config/models/tiny_*.json")))
MAX_LEN = 64
CHUNK = 16
STEPS = 8
TOL = 1e-5        # logits tolerance for "equal" (observed: 0.0, bit-exact, on CPU float32)
HF_ATOL = 1e-4    # ours (chunked, over the live state) vs transformers' one-shot forward
# A negative control "diverges" when a token differs, or the logits are not bit-identical to the
# cold run's AND the state it carries on (after the observation or after the 8 steps) is off by
# more than STATE_REL of its scale, or the logits move by more than LOGIT_REL of their scale. Why
# not tokens alone: with random-init weights (init std 0.02) the residual stream dominates, so a
# wrong state can leave the argmax unchanged (falcon_h1: logits move 0.2-0.7% of their scale,
# the carried state is off by >100%); the restore path is bit-exact (0.0).
STATE_REL = 1e-2
LOGIT_REL = 1e-4  # ~1000x float32 rounding of the logits


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda p: Path(p).stem)
def model(request) -> HybridModel:
    # No skip: a family config that fails to load fails here.
    return HybridModel.load(ModelSpec(config_file=str(ROOT / request.param), max_len=MAX_LEN))


_seeds = itertools.count(1)


@pytest.fixture(autouse=True)
def _fresh_seeds():
    """Every test draws the same observations whatever ran before it (derandomized CI)."""
    global _seeds
    _seeds = itertools.count(1)


def obs(m: HybridModel, n: int) -> torch.Tensor:
    """An observation: embeddings of ``n`` random tokens (the model's own input scale)."""
    g = torch.Generator().manual_seed(next(_seeds))
    ids = torch.randint(0, m.model.config.vocab_size, (n,), generator=g)
    with torch.no_grad():
        return m.token_embedding()(ids.to(m.live.device)).float().cpu()


def history(e: Engine, stream: str, sizes) -> None:
    for n in sizes:
        e.query(stream, obs(e.model, n), act=lambda h: None)
        e.commit()


def dirty(e: Engine, other: str = "other", sizes=(21, 6)) -> None:
    """Another stream's queries overwrite the live buffers; then every byte is scrubbed."""
    if other not in e.store:
        e.add_stream(other)
    history(e, other, sizes)


@torch.no_grad()
def engine_greedy(e: Engine, stream: str, x: torch.Tensor, steps: int = STEPS):
    """The engine path: query (restores the stream's boundary), then extend token by token."""
    m = e.model
    emb = m.token_embedding()
    r = e.query(stream, x, act=lambda h: m.logits(h).float())
    lg, tokens, logits = r.output, [], []
    for _ in range(steps):
        tok = int(lg.argmax())
        tokens.append(tok)
        logits.append(lg)
        h = e.extend(emb(torch.tensor([tok], device=m.live.device)).float())
        lg = m.logits(h[-1]).float()
    e.abort()  # leave the stream at its boundary
    return tokens, torch.stack(logits), r


def snapshot(m: HybridModel):
    return capsule_ops.snapshot(m.live, fingerprint=m.fingerprint, position=m.position,
                              meta=m.read_meta())


def state_views(m: HybridModel) -> dict[str, torch.Tensor]:
    """Each conv/recurrent buffer, as the model sees it (a copy)."""
    return {s.name: m.live.view(s.name).clone() for s in m.live.layout.specs if s.kind is not Kind.KV}


@torch.no_grad()
def run(m: HybridModel, x: torch.Tensor):
    """Greedy on the model from whatever the live state holds (the observation, then STEPS
    tokens); also the state right after the observation and the state it ends in."""
    h = m.forward(x)  # len(x) <= CHUNK: one chunk, as the engine appends it
    after_obs = state_views(m)
    emb = m.token_embedding()
    tokens, logits = [], []
    for _ in range(STEPS):
        lg = m.logits(h[-1]).float()
        tokens.append(int(lg.argmax()))
        logits.append(lg)
        h = m.forward(emb(torch.tensor([tokens[-1]], device=m.live.device)).float())
    return tokens, torch.stack(logits), (after_obs, state_views(m))


def cold(e: Engine, capsule, x: torch.Tensor):
    """Cold reference: recompute the boundary from its journal, then decode on the model. The
    recompute goes through the engine's own append code, so the continuation is also checked
    against transformers' own forward over the same tokens (``transformers_reference``)."""
    recomputed = e.recompute(capsule)
    report = compare_capsules(e.model.live.layout, capsule, recomputed)
    assert report.ok, report.text()
    ref = run(e.model, x)
    hf_tokens, hf_logits = transformers_reference(e.model, capsule, x)
    assert ref[0] == hf_tokens, f"cold {ref[0]} != transformers {hf_tokens}"
    torch.testing.assert_close(ref[1], hf_logits, atol=HF_ATOL, rtol=1e-4)
    return ref


def token_ids(m: HybridModel, embeds: torch.Tensor) -> torch.Tensor:
    """The token ids behind token embeddings (exactly: every observation here is token
    embeddings, so the inversion is checked bit for bit)."""
    table = m.token_embedding()
    with torch.no_grad():
        rows = table(torch.arange(m.model.config.vocab_size, device=m.live.device)).float().cpu()
    ids = torch.cdist(embeds.float().cpu(), rows).argmin(dim=1)
    with torch.no_grad():
        assert torch.equal(table(ids.to(m.live.device)).float().cpu(), embeds.float().cpu())
    return ids


@torch.no_grad()
def transformers_reference(m: HybridModel, capsule, x: torch.Tensor, steps: int = STEPS):
    """Greedy over the boundary's tokens + ``x``'s with transformers' own one-shot forward
    (``input_ids``, no cache, none of our buffers): independent of the append code under test."""
    seq = torch.cat([token_ids(m, j.embeds) for j in capsule.journal] + [token_ids(m, x)])
    assert seq.shape[0] == capsule.position + x.shape[0]
    tokens, logits = [], []
    for _ in range(steps):
        out = m.model(input_ids=seq[None].to(m.live.device), use_cache=False)
        lg = out.logits[0, -1].float().cpu()
        tokens.append(int(lg.argmax()))
        logits.append(lg)
        seq = torch.cat([seq, torch.tensor([tokens[-1]])])
    return tokens, torch.stack(logits)


def assert_same(ref, got, what: str) -> float:
    ref_tokens, ref_logits = ref[0], ref[1]
    tokens, logits = got[0], got[1]
    err = float((ref_logits - logits).abs().max())
    assert tokens == ref_tokens, f"{what}: tokens {tokens} != cold {ref_tokens} (max |dlogit| {err:.3g})"
    assert err <= TOL, f"{what}: logits differ from cold by {err:.3g}"
    print(f"{what}: tokens equal, max |dlogit| {err:.3g}")
    return err


def diverged(m: HybridModel, ref, got) -> tuple[bool, str]:
    """Whether a continuation left the cold one; ``ref`` and ``got`` come from ``run``."""
    err = float((ref[1] - got[1]).abs().max())
    scale = float(ref[1].abs().max())
    rel = 0.0
    for a, b in zip(ref[2], got[2]):  # after the observation, after the last step
        for name in a:  # per buffer: max |diff| relative to that buffer's own scale
            d = float((a[name] - b[name]).abs().max())
            rel = max(rel, d / max(float(a[name].abs().max()), 1e-30))
    tokens = got[0] != ref[0]
    why = (f"tokens differ={tokens}, max|dlogit|={err:.3g} ({err / scale:.2g} of the logit scale), "
           f"carried state off by {rel:.3g} of its scale")
    return tokens or err > LOGIT_REL * scale or (err > 0 and rel > STATE_REL), why


# -- byte-exact restore ---------------------------------------------------------------------
def test_restore_is_byte_exact(model):
    e = Engine(model, chunk_size=CHUNK, full_journal=True)
    e.add_stream("a")
    history(e, "a", (13, 8, 1))
    cap = e.boundary("a")
    assert len(cap.kv) == 3  # delta commits: one segment per query
    # The delta-committed capsule equals a full snapshot of the same live state.
    full = capsule_ops.snapshot(model.live, fingerprint=model.fingerprint, position=model.position,
                              meta=model.read_meta())
    assert compare_capsules(model.live.layout, cap, full).ok
    dirty(e)
    model.live.scrub()
    e.invalidate()
    assert live_mismatches(model.live, cap, model.read_meta())  # scrubbed: differs
    assert e.restore("a") is True
    assert live_mismatches(model.live, cap, model.read_meta()) == []
    assert model.read_meta() == dict(cap.meta)
    for k, t in cap.meta_tensors.items():
        assert torch.equal(e.meta_tensors[k], t)
    # The checker itself is sensitive to one flipped element of any kind.
    for spec in model.live.layout.specs:
        view = model.live.view(spec.name)
        idx = (0,) * view.ndim
        saved = view[idx].clone()
        view[idx] += 1.0
        assert spec.name in live_mismatches(model.live, cap, model.read_meta())
        view[idx] = saved
    assert live_mismatches(model.live, cap, model.read_meta()) == []


# -- continuation after a dirty restore, with the negative controls ---------------------------
def test_continuation_after_dirty_restore_and_negative_controls(model):
    m = model
    e = Engine(m, chunk_size=CHUNK, full_journal=True)
    e.add_stream("a")
    history(e, "a", (11, 8))
    cap = e.boundary("a")
    # A one-token observation: its first step reads the restored conv window and recurrent state
    # directly (a longer one would overwrite the short conv window before the first logits).
    x = obs(m, 1)
    ref = cold(e, cap, x)

    # The same dirtied buffers for every variant below: another stream's state, then noise.
    dirty(e)
    m.live.scrub()
    dirty_regions = {k: r.clone() for k, r in m.live.regions.items()}
    dirty_meta = m.read_meta()

    def from_dirty() -> None:
        for k, r in m.live.regions.items():
            r.copy_(dirty_regions[k])
        m.write_meta(dirty_meta)
        e.invalidate()

    # Positive: the engine's restore (query path), then the manual full restore.
    from_dirty()
    got = engine_greedy(e, "a", x)
    assert got[2].restored
    assert_same(ref, got, "engine restore after dirty")
    from_dirty()
    capsule_ops.restore(cap, m.live, m.fingerprint)
    m.write_meta(dict(cap.meta))
    assert live_mismatches(m.live, cap, m.read_meta()) == []
    assert_same(ref, run(m, x), "manual full restore after dirty")

    specs = m.live.layout.specs
    skipped = []
    results = {}
    # Negative control 1: KV-only restore (conv/recurrent state left dirty) diverges.
    if any(s.kind is Kind.KV for s in specs) and any(s.kind is not Kind.KV for s in specs):
        from_dirty()
        for key, region in m.live.kv_regions().items():
            for seg in cap.kv:
                region[seg.start:seg.stop].copy_(seg.rows[key])
        m.write_meta(dict(cap.meta))
        results["kv_only"] = diverged(m, ref, run(m, x))
    else:
        skipped.append("kv_only: the family has no KV or no constant-size state")
    # Negative control 2: full restore, then the dirty conv state written back, diverges.
    conv = [s.name for s in specs if s.kind is Kind.CONV]
    if conv:
        from_dirty()
        dirty_conv = {n: m.live.view(n).clone() for n in conv}
        capsule_ops.restore(cap, m.live, m.fingerprint)
        m.write_meta(dict(cap.meta))
        for n in conv:
            m.live.view(n).copy_(dirty_conv[n])
        results["skip_conv"] = diverged(m, ref, run(m, x))
    else:
        skipped.append("skip_conv: the family has no conv state")
    # Negative control 3: full restore, Python-side flags left False, diverges.
    flags = list(cap.meta["flags"])
    if flags and any(flags):
        from_dirty()
        capsule_ops.restore(cap, m.live, m.fingerprint)
        m.write_meta({**cap.meta, "flags": [False] * len(flags)})
        results["skip_flags"] = diverged(m, ref, run(m, x))
    else:
        skipped.append("skip_flags: the family has no has_previous_state flags")
    print(f"negative controls ({m.model.config.model_type}): "
          + "; ".join(f"{k}: diverged={d} ({why})" for k, (d, why) in results.items()))
    failed = [k for k, (d, _) in results.items() if not d]
    assert not failed, f"negative controls did not diverge: {failed} ({results})"
    # And the full restore on the very same dirtied buffers still matches (after the controls).
    from_dirty()
    assert_same(ref, engine_greedy(e, "a", x), "engine restore after the controls")
    for why in skipped:
        warnings.warn(f"{m.model.config.model_type}: negative control skipped: {why}")


# -- forks -------------------------------------------------------------------------------------
def test_two_forks_continue_identically_then_diverge_without_contamination(model):
    m = model
    e = Engine(m, chunk_size=CHUNK, full_journal=True)
    e.add_stream("a")
    history(e, "a", (9, 7))
    cap = e.boundary("a")
    e.fork("a", "f1")
    e.fork("a", "f2")
    x = obs(m, 4)
    ref = cold(e, cap, x)
    dirty(e)
    got1 = engine_greedy(e, "f1", x)
    dirty(e)
    got2 = engine_greedy(e, "f2", x)
    assert_same(ref, got1, "fork 1")
    assert_same(ref, got2, "fork 2")
    # Different observations: each fork follows its own journal, the source is untouched.
    history(e, "f1", (6,))
    history(e, "f2", (3,))
    history(e, "f1", (2,))
    for s in ("f1", "f2", "a"):
        rep = e.verify(s)
        assert rep.ok, rep.text()
    assert e.boundary("a") is cap
    b1, b2 = e.boundary("f1"), e.boundary("f2")
    assert not compare_capsules(m.live.layout, b1, b2).ok
    # f1 continues right after f2 ran: what it sees is its own boundary only.
    y = obs(m, 4)
    ref1 = cold(e, b1, y)
    history(e, "f2", (5,))
    assert_same(ref1, engine_greedy(e, "f1", y), "fork 1 after fork 2 diverged")


# -- rollback ----------------------------------------------------------------------------------
def test_rollback_continuation(model):
    m = model
    e = Engine(m, chunk_size=CHUNK, history_depth=4, full_journal=True)
    e.add_stream("a")
    caps = []
    for n in (7, 9, 3, 5):
        history(e, "a", (n,))
        caps.append(e.boundary("a"))
    assert e.rollback("a", 2) is caps[1]
    x = obs(m, 6)
    ref = cold(e, caps[1], x)
    dirty(e)
    assert_same(ref, engine_greedy(e, "a", x), "after rollback(2)")
    history(e, "a", (4,))  # delta commit on the rolled-back parent
    rep = e.verify("a")
    assert rep.ok, rep.text()


# -- rebase ------------------------------------------------------------------------------------
def test_rebase_continuation_and_delta_commit(model):
    m = model
    e = Engine(m, chunk_size=CHUNK, context_policy="rebase", rebase_window=2, full_journal=True)
    e.add_stream("a")
    history(e, "a", (12,) * 5)  # 60 of 64
    journal = e.boundary("a").journal
    r = e.query("a", obs(m, 12), act=lambda h: None)
    assert [c for c, _ in r.events] == [Code.CONTEXT_REBASED]
    e.commit()
    cap = e.boundary("a")
    assert cap.position == 36  # empty base + the last 2 observations + the new one
    assert all(a is b for a, b in zip(cap.journal[:2], journal[-2:]))
    x = obs(m, 4)
    ref = cold(e, cap, x)
    dirty(e)
    assert_same(ref, engine_greedy(e, "a", x), "after rebase")
    history(e, "a", (5, 3))  # delta commits after the rebase
    rep = e.verify("a")
    assert rep.ok, rep.text()


# -- verify mode ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> HybridModel:
    return HybridModel.load(ModelSpec(config_file=str(ROOT / "config/models/tiny_qwen3_5_text.json"),
                                      max_len=MAX_LEN))


def idle(e: Engine) -> int:
    """Run the engine's background work to the end (what the worker does between queries)."""
    slices = 0
    while e.idle_step() is not None:
        slices += 1
    return slices


def test_verify_mode_runs_at_idle_in_chunk_slices_and_passes(small):
    m = small
    e = Engine(m, chunk_size=CHUNK, verify_every=2)
    e.add_stream("a")
    e.add_stream("b")
    history(e, "a", (7,))
    history(e, "b", (5, 3))  # b's 2nd commit queues b
    history(e, "a", (6,))    # a's 2nd commit queues a
    assert e.counters["verifies"] == 0 and e.verifications_due == 2  # nothing on the query path
    slices = idle(e)
    # one slice per chunk appended: b 5+3 and a 7+6 tokens, chunks of CHUNK
    chunks = sum(-(-n // CHUNK) for n in (5, 3, 7, 6))
    assert e.counters["verify_slices"] == chunks and slices >= chunks
    assert e.counters["verifies"] == 2 and e.counters["verify_mismatches"] == 0
    rep = e.last_verify
    assert rep.ok and rep.stream == "a" and rep.position == 13, rep.text()
    assert rep.buffers == len(m.live.layout.specs) + len(e.boundary("a").meta)
    r = e.query("a", obs(m, 2), act=lambda h: None)   # the next query restores a's boundary
    e.commit()
    assert r.restored


def test_queries_between_verification_slices_change_nothing(small):
    """A verification interrupted by queries (on its own stream and another) after every slice
    reaches the same verdict, and the queries answer exactly as on an engine that verifies
    nothing (its own model: the two must not share live buffers)."""
    m = small
    m2 = HybridModel.load(ModelSpec(config_file=str(ROOT / "config/models/tiny_qwen3_5_text.json"),
                                    max_len=MAX_LEN))
    e = Engine(m, chunk_size=CHUNK, verify_every=1)
    ref = Engine(m2, chunk_size=CHUNK)
    first = obs(m, 3 * CHUNK + 1)          # four slices to recompute
    later = [obs(m, 2 + k % 3) for k in range(16)]
    for eng in (e, ref):
        eng.add_stream("a")
        eng.add_stream("b")
        eng.query("a", first, act=lambda h: None)
        eng.commit()
    outs, ref_outs = [], []
    k = 0
    while e.idle_step() is not None and k < len(later):
        for eng, out in ((e, outs), (ref, ref_outs)):
            r = eng.query("ab"[k % 2], later[k], act=lambda h: h.clone())
            eng.commit()
            out.append(r.output)
        k += 1
    idle(e)
    assert e.counters["verifies"] >= 1 and e.counters["verify_mismatches"] == 0
    assert e.counters["verify_slices"] >= 4 and len(outs) >= 4
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))


def test_verify_catches_a_stale_live_state(small):
    """A restore that silently missed bytes (simulated: a live recurrent/conv value changed
    behind the engine's back) is baked into the next delta commit; verify reports it, without
    breaking the query path."""
    m = small
    e = Engine(m, chunk_size=CHUNK, verify_every=2)
    e.add_stream("a")
    history(e, "a", (7,))
    name = next(s.name for s in m.live.layout.specs if s.kind is not Kind.KV)
    m.live.view(name).view(-1)[3] += 0.5  # the engine still believes the live state is a's
    r = e.query("a", obs(m, 4), act=lambda h: None)
    assert not r.restored
    ms = e.commit()  # 2nd commit: queued for verification, the commit stands
    assert isinstance(ms, float)
    idle(e)
    assert e.counters["verify_mismatches"] == 1
    rep = e.last_verify
    assert not rep.ok and rep.first is not None and rep.mismatched
    print(rep.text())
    history(e, "a", (3,))  # the stream keeps working


def test_verify_names_the_first_divergence_of_a_corrupted_capsule(small):
    m = small
    e = Engine(m, chunk_size=CHUNK, full_journal=True)
    e.add_stream("a")
    history(e, "a", (9, 5))
    assert e.verify("a").ok
    cap = e.boundary("a")
    # Corrupt one element of one named state buffer inside the committed capsule.
    spec = [s for s in m.live.layout.specs if s.kind is not Kind.KV][-1]
    offset = 0
    for s in m.live.layout.specs:
        if s.kind is not Kind.KV and s.dtype == spec.dtype:
            if s is spec:
                break
            offset += s.row_elems
    key = next(k for k in cap.state if k.startswith("state."))
    saved = cap.state[key][offset + 11].clone()
    cap.state[key][offset + 11] += 1.0
    rep = e.verify("a")
    assert not rep.ok
    assert rep.first.buffer == spec.name and rep.first.index == 11, rep.text()
    assert rep.first.committed == pytest.approx(rep.first.cold + 1.0)
    assert e.counters["verify_mismatches"] == 1
    # Corrupt a KV row: the first divergence is in that attention buffer's valid part.
    cap.state[key][offset + 11] = saved
    kv_key = next(iter(cap.kv[0].rows))
    cap.kv[-1].rows[kv_key][0, 0] += 1.0  # first K element of the last segment's first row
    rep = e.verify("a")
    kspec = next(s for s in m.live.layout.specs if s.kind is Kind.KV)
    assert not rep.ok and rep.first.buffer == kspec.name, rep.text()


def test_verify_failure_does_not_break_the_query_path(small, monkeypatch):
    import capsule_ros.runtime.engine as engine_module
    m = small
    e = Engine(m, chunk_size=CHUNK, verify_every=1)
    e.add_stream("a")

    def boom(*a, **k):
        raise RuntimeError("compare exploded")

    monkeypatch.setattr(engine_module, "compare_capsules", boom)
    history(e, "a", (4,))
    idle(e)
    assert e.counters["verify_errors"] == 1
    assert e.last_verify.error and not e.last_verify.ok
    monkeypatch.undo()
    history(e, "a", (3,))  # the stream keeps working, and verify works again
    idle(e)
    assert e.last_verify.ok and e.counters["verifies"] == 1
