"""Graph-bound execution: replay equals eager, restore needs no recapture, traps are handled."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capsule_ros.models import HybridModel, ModelSpec
from capsule_ros.runtime.engine import Engine
from capsule_ros.runtime.graphs import decompose

pytestmark = pytest.mark.gpu
CONFIGS = Path(__file__).resolve().parents[2] / "config" / "models"
FAMILIES = ["default_qwen3_5.json", "tiny_bamba.json"]


def load(config: str, dtype: str = "float32", max_len: int = 1024) -> HybridModel:
    return HybridModel.load(ModelSpec(config_file=str(CONFIGS / config), dtype=dtype,
                                      device="cuda", max_len=max_len))


def embeds(model: HybridModel, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, model.hidden_size, device="cuda", generator=g)


def per_chunk(model: HybridModel, x: torch.Tensor) -> torch.Tensor:
    """Append ``x`` in the runner's chunk decomposition (so eager and graph do the same work)."""
    outs, done = [], 0
    for c in decompose(x.shape[0], model.runner.max_chunk):
        outs.append(model.forward(x[done:done + c]))
        done += c
    return torch.cat(outs)


@pytest.mark.parametrize("config", FAMILIES)
def test_graph_replay_is_bit_identical_to_eager_from_the_same_state(config):
    m = load(config)
    m.enable_graphs(max_chunk=64)
    e = Engine(m)
    e.add_stream("a")
    e.query("a", embeds(m, 70, 0), act=lambda h: None)
    e.commit()
    x = embeds(m, 33, 1)  # 32 + 1: a prefill chunk and the seq_len == 1 decode variant
    m.use_graphs = False
    e.restore("a")
    eager = per_chunk(m, x)
    eager_state = {k: r.clone() for k, r in m.live.regions.items()}
    e.abort()
    m.use_graphs = True
    e.restore("a")
    graph = m.forward(x)
    assert torch.equal(graph, eager)
    for k, r in m.live.regions.items():
        assert torch.equal(r, eager_state[k]), k
    assert m.runner.replays >= 2


@pytest.mark.parametrize("config", FAMILIES)
def test_restore_then_replay_is_exact_after_dirtying_and_needs_no_recapture(config):
    m = load(config)
    m.enable_graphs(max_chunk=64)
    e = Engine(m)
    for s in ("a", "b"):
        e.add_stream(s)
        e.query(s, embeds(m, 40, hash(s) % 100), act=lambda h: None)
        e.commit()
    x = embeds(m, 16, 5)
    e.restore("a")
    reference = m.forward(x).clone()
    e.abort()
    e.restore("b")
    m.forward(embeds(m, 16, 6))  # dirty the live buffers with the other stream
    e.abort()
    captures = m.runner.captures
    e.restore("a")
    again = m.forward(x)
    assert torch.equal(again, reference)
    assert m.runner.captures == captures, "a restore must not need a recapture"


@pytest.mark.parametrize("config", FAMILIES)
def test_capsule_path_equals_cold_run_of_the_same_chunked_history(config):
    m = load(config)
    m.enable_graphs(max_chunk=64)
    e = Engine(m, full_journal=True)  # recompute replays the whole history
    e.add_stream("a")
    history = [embeds(m, n, i) for i, n in enumerate((64, 48, 17))]
    for h in history:
        e.query("a", h, act=lambda x: None)
        e.commit()
    x = embeds(m, 8, 9)
    e.restore("a")
    warm = m.forward(x).clone()
    e.abort()
    e.recompute(e.boundary("a"))  # cold: from empty, the same appends
    cold = m.forward(x)
    e.abort()
    assert torch.equal(warm, cold)


@pytest.mark.parametrize("config", FAMILIES)
def test_graph_path_matches_transformers_one_shot_forward(config):
    m = load(config, dtype="bfloat16")
    m.enable_graphs(max_chunk=64)
    e = Engine(m)
    e.add_stream("a")
    vocab = m.model.config.vocab_size
    ids = torch.randint(1, vocab, (100,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    emb = m.token_embedding()(ids).float()
    e.query("a", emb[:96], act=lambda h: None)
    e.commit()
    e.restore("a")
    hidden = m.forward(emb[96:])
    ours = m.logits(hidden[-1]).float()
    e.abort()
    with torch.no_grad():
        ref = m.model(input_ids=ids[None]).logits[0, -1].float()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 3e-2, f"relative logit error {rel:.3g} (bf16)"
    assert int(ours.argmax()) == int(ref.argmax())


def test_variant_follows_the_capsule_metadata_and_window_follows_length():
    m = load("default_qwen3_5.json", max_len=4096)
    m.enable_graphs(max_chunk=64)
    e = Engine(m)
    e.add_stream("a")
    e.query("a", embeds(m, 16, 0), act=lambda h: None)  # empty context: the 'first' variant
    e.commit()
    assert (16, 256, "first") in m.runner.graphs
    e.query("a", embeds(m, 1, 1), act=lambda h: None)  # a restored context: 'cont', decode
    e.commit()
    assert (1, 256, "cont") in m.runner.graphs
    e.query("a", embeds(m, 64 * 40, 2)[:2500], act=lambda h: None)
    e.commit()
    m.forward(embeds(m, 1, 3))  # decode at position ~2517 reads a 4096-row window
    e.abort()
    assert (1, 4096, "cont") in m.runner.graphs
    # flags off with a non-empty context has no captured variant: refused, not run wrongly
    e.restore("a")
    m.write_meta({"position": m.position, "flags": [False] * m.num_flags})
    with pytest.raises(RuntimeError, match="position"):
        m.forward(embeds(m, 1, 4))
    e.abort()


def test_sampling_after_restore_reproduces_the_sample():
    from capsule_ros.policy.heads import TokenSampler
    m = load("default_qwen3_5.json")
    m.enable_graphs(max_chunk=64)
    e = Engine(m)
    e.add_stream("a")
    sampler = TokenSampler(temperature=1.0, top_p=0.9)
    gen = sampler.new_generator("cuda")
    e.meta_tensors["rng"] = gen.get_state()
    e.query("a", embeds(m, 20, 0), act=lambda h: None)
    e.commit()

    def sample() -> list[int]:
        e.restore("a")
        g = torch.Generator(device="cuda")
        g.set_state(e.meta_tensors["rng"])
        h = m.forward(embeds(m, 4, 1))[-1]
        out = []
        for _ in range(5):
            tok = sampler.pick(m.logits(h), g)
            out.append(tok)
            h = m.forward(m.token_embedding()(torch.tensor([tok], device="cuda")).float())[-1]
        e.abort()
        return out
    assert sample() == sample()
