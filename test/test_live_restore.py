"""One live buffer set, per-stream capsules: restore is exact, and the recurrent state matters.

In one test, on the same live buffers dirtied by another stream: a restore is byte-exact; greedy
continuation after restore equals a cold run of the same history; restoring only the attention
KV (the negative control) gives different logits.
"""
from __future__ import annotations

import pytest
import torch

from capsule_ros.models import HybridModel, ModelSpec
from capsule_ros.runtime.engine import Engine

CONFIG = "config/models/default_qwen3_5.json"


def _continue_greedy(model: HybridModel, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode from whatever the live state holds now (no restore, no commit)."""
    probe = torch.linspace(-1, 1, model.hidden_size)[None]  # a fixed new observation
    hidden = model.forward(probe)[-1]
    tokens, logits = [], []
    for _ in range(steps):
        lg = model.logits(hidden)
        tokens.append(int(lg.argmax()))
        logits.append(lg)
        emb = model.token_embedding()(torch.tensor([tokens[-1]]))
        hidden = model.forward(emb)[-1]
    return tokens, torch.stack(logits)


def _valid_bytes(model: HybridModel, position: int) -> dict[str, torch.Tensor]:
    out = {k: r[:position].clone() for k, r in model.live.kv_regions().items()}
    out.update({k: r.clone() for k, r in model.live.state_regions().items()})
    return out


def test_restore_exact_continuation_matches_cold_and_kv_only_diverges(package_root):
    model = HybridModel.load(ModelSpec(config_file=str(package_root / CONFIG), max_len=256))
    engine = Engine(model, chunk_size=16, full_journal=True)  # recompute replays the journal
    for s in ("a", "b"):
        engine.add_stream(s)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):  # stream a: three observations of 17 tokens (chunks of 16 + 1)
        engine.query("a", torch.randn(17, model.hidden_size, generator=gen), act=lambda h: h)
        engine.commit()
    capsule = engine.boundary("a")
    assert capsule.position == 51

    def dirty() -> None:  # another stream overwrites the shared live buffers
        engine.query("b", torch.randn(40, model.hidden_size, generator=gen), act=lambda h: h)
        engine.commit()

    # 1. byte-exact restore into dirtied buffers
    dirty()
    assert engine.restore("a") is True
    restored = _valid_bytes(model, capsule.position)
    for key, region in restored.items():
        expected = capsule.kv_rows(key) if key.startswith("kv.") else capsule.state[key]
        assert torch.equal(region, expected), key
    assert model.read_meta() == dict(capsule.meta)

    # 2. greedy continuation after restore == cold run of the same history (same chunking)
    warm_tokens, warm_logits = _continue_greedy(model, 8)
    engine.abort()  # the live state moved past the boundary without a commit
    dirty()
    engine.recompute(capsule)
    cold_tokens, cold_logits = _continue_greedy(model, 8)
    engine.abort()
    assert warm_tokens == cold_tokens
    assert torch.allclose(warm_logits, cold_logits, atol=1e-5, rtol=0)

    # 3. negative control on the same dirtied buffers: restore only the attention KV (+ meta)
    dirty()
    for key, region in model.live.kv_regions().items():
        region[:capsule.position].copy_(capsule.kv_rows(key))
    model.write_meta(dict(capsule.meta))
    kv_only_tokens, kv_only_logits = _continue_greedy(model, 8)
    engine.abort()
    gap = (kv_only_logits - warm_logits).abs().max().item()
    assert gap > 1e-2, f"KV-only restore should diverge (recurrent state is load-bearing), gap {gap}"
    assert engine.counters["restores"] >= 4


def test_recompute_refuses_a_journal_that_does_not_reach_back():
    """Without a full journal a boundary cannot be recomputed cold: refused, never a silently
    different state from a part of its history."""
    from capsule_ros.capsule import CapsuleError
    m = HybridModel.load(ModelSpec(config_file=CONFIG, max_len=128))
    e = Engine(m, chunk_size=16)          # full_journal off, verify off: journal not kept whole
    e.add_stream("a")
    g = torch.Generator().manual_seed(0)
    for n in (16, 9):
        e.query("a", torch.randn(n, m.hidden_size, generator=g), act=lambda h: None)
        e.commit()
    boundary = e.boundary("a")
    assert sum(x.embeds.shape[0] for x in boundary.journal) < boundary.position
    with pytest.raises(CapsuleError, match="journal does not reach back"):
        e.recompute(boundary)
    assert e.store.position("a") == 25    # the stream is as it was
