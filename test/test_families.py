"""Every family's tiny config: our forward over the live state equals transformers' own.

For each ``config/models/tiny_<family>.json`` the same seeded weights run twice:
* reference: ``model(input_ids=...)`` one-shot, float32, no capsule machinery;
* ours: token embeddings (``HybridModel.token_embedding``, which applies the family's input
  scale) appended in chunks through ``Engine``, logits via the family descriptor.
Logits agree within tolerance, greedy decoding (fed back with ``engine.extend``) picks the same
tokens for N steps, and a prefix committed, restored and appended to equals the one-shot forward.
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from capsule_ros.models import FAMILIES, HybridModel, ModelSpec
from capsule_ros.models.__main__ import main as models_main
from capsule_ros.models.hybrid import load_transformers_model
from capsule_ros.models.registry import tiny_config
from capsule_ros.runtime.engine import Engine

PROMPT, PREFIX, CHUNK, STEPS, MAX_LEN = 20, 12, 8, 8, 128
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def _build(family: str):
    spec = ModelSpec(config_file=str(tiny_config(family)), seed=0, max_len=MAX_LEN)
    model, weights_id = load_transformers_model(spec)
    ids = torch.randint(3, model.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the reference, before the binding touches anything
        ref_logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
        seq = ids.clone()
        ref_tokens, ref_step_logits = [], []
        for _ in range(STEPS):
            last = model(input_ids=seq[None], use_cache=False).logits[0, -1].float()
            tok = int(torch.argmax(last))
            ref_tokens.append(tok)
            ref_step_logits.append(last)
            seq = torch.cat([seq, torch.tensor([tok])])
    bound = HybridModel.bind(model, spec, weights_id)
    return bound, ids, ref_logits, ref_tokens, ref_step_logits




@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return (request.param, *_build(request.param))


def test_tiny_config_has_attention_and_recurrent_state(family):
    name, bound, *_ = family
    kinds = {s.kind.value for s in bound.live.layout.specs}
    assert "kv" in kinds and kinds & {"conv", "recurrent"}, kinds
    assert bound.model.config.model_type == name


def test_chunked_forward_matches_one_shot_logits(family):
    _, bound, ids, ref_logits, *_ = family
    engine = Engine(bound, chunk_size=CHUNK)
    engine.add_stream("s")
    engine.restore("s")  # empty
    emb = bound.token_embedding()(ids)
    hidden = torch.cat([bound.forward(emb[i:i + CHUNK]) for i in range(0, PROMPT, CHUNK)])
    ours = bound.logits(hidden).float()
    torch.testing.assert_close(ours, ref_logits, atol=ATOL, rtol=1e-4)


def test_greedy_decode_through_engine_matches_reference(family):
    _, bound, ids, ref_logits, ref_tokens, ref_step_logits = family
    engine = Engine(bound, chunk_size=CHUNK)
    engine.add_stream("s")
    result = engine.query("s", bound.embed_tokens(ids), act=lambda h: bound.logits(h).float())
    torch.testing.assert_close(result.output, ref_logits[-1], atol=ATOL, rtol=1e-4)
    logits, tokens = result.output, []
    for step in range(STEPS):
        torch.testing.assert_close(logits, ref_step_logits[step], atol=ATOL, rtol=1e-4)
        tokens.append(int(torch.argmax(logits)))
        hidden = engine.extend(bound.embed_tokens([tokens[-1]]), source="decode")
        logits = bound.logits(hidden[-1]).float()
    engine.commit()
    assert tokens == ref_tokens
    assert engine.boundary("s").position == PROMPT + STEPS


def test_prefix_then_append_matches_one_shot(family):
    _, bound, ids, ref_logits, *_ = family
    engine = Engine(bound, chunk_size=CHUNK)
    engine.add_stream("a")
    engine.add_stream("other")
    emb = bound.embed_tokens(ids)
    first = engine.query("a", emb[:PREFIX], act=lambda h: bound.logits(h).float())
    engine.commit()
    torch.testing.assert_close(first.output, ref_logits[PREFIX - 1], atol=ATOL, rtol=1e-4)
    engine.query("other", emb[:5].flip(0), act=lambda h: None)  # dirties the live state
    engine.commit()
    second = engine.query("a", emb[PREFIX:], act=lambda h: bound.logits(h).float())
    engine.commit()
    assert second.restored
    torch.testing.assert_close(second.output, ref_logits[-1], atol=ATOL, rtol=1e-4)


def test_models_list_command():
    out = io.StringIO()
    with redirect_stdout(out):
        rc = models_main(["--list", "--max-len", "64"])
    assert rc == 0
    doc = json.loads(out.getvalue())
    assert sorted(e["model_type"] for e in doc["families"]) == sorted(FAMILIES)
    for e in doc["families"]:
        load = e["load"]
        assert load["ok"], e
        assert load["layout"]["kv"]["bytes_per_token"] == load["kv_bytes_per_token"] > 0
        constant = sum(v.get("bytes_constant", 0) for v in load["layout"].values())
        assert constant == load["state_bytes_constant"] > 0
    falcon = next(e for e in doc["families"] if e["model_type"] == "falcon_h1")
    assert falcon["input_scale"] == "embedding_multiplier"  # multipliers set away from 1 in its config
    # falcon_h1 keeps attention and mamba state in the same layers
    assert falcon["load"]["layout"]["kv"]["layers"] == falcon["load"]["layout"]["conv"]["layers"]
