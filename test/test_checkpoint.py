"""Loading a local checkpoint directory through the node's parameters (``model.path``).

Each test saves its own checkpoint (``save_pretrained`` of a seeded random tiny model): loading it
through ``from_params`` / ``build_pipeline`` gives the same outputs as the in-memory model; a
missing file is an error naming it; ``policy.safetensors`` beside it supplies encoder and head
weights; tokenizer files beside it give the text encoder and the token head a real tokenizer.
"""
from __future__ import annotations

import os
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from capsule_ros.config import from_params
from capsule_ros.models import ModelLoadError, ModelSpec
from capsule_ros.models.hybrid import load_transformers_model
from capsule_ros.models.registry import tiny_config
from capsule_ros.policy.weights import POLICY_WEIGHTS_FILE, save_policy_weights
from capsule_ros.runtime.build import build_pipeline
from capsule_ros.runtime.pipeline import Pipeline
from capsule_ros.runtime.outcome import Answer

FAMILY = "qwen3_5_text"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py




def params(path: str = "", seed: int = 0, head: dict | None = None) -> dict:
    return {
        "model": {"config_file": str(tiny_config(FAMILY)), "path": path, "seed": seed,
                  "max_context": 128, "chunk_size": 16},
        "inputs": {"names": ["obs", "instr"],
                   "obs": {"topic": "/obs", "type": "std_msgs/msg/Float32MultiArray",
                           "encoder": "float_array", "length": 4, "tokens": 2},
                   "instr": {"topic": "/instr", "type": "std_msgs/msg/String", "encoder": "text"}},
        "streams": {"names": ["s"],
                    "s": {"trigger": "obs", "context": ["instr"],
                          "head": head or {"kind": "continuous", "horizon": 3, "dof": 2,
                                           "step_period": 0.1}}},
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model saved with save_pretrained; returns (dir, the in-memory model)."""
    root = tmp_path_factory.mktemp("ckpt")
    model, _ = load_transformers_model(ModelSpec(config_file=str(tiny_config(FAMILY)), seed=7))
    model.save_pretrained(root)
    return root, model


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _answers(pipe: Pipeline, n: int = 3) -> list[Answer]:
    out = []
    pipe.on_message("instr", NS(data="go left"), 0, out.append)
    for i in range(n):
        pipe.on_message("obs", NS(data=[0.1 * i, -0.2, 0.3, 1.0 + i]), i, out.append)
    assert all(isinstance(a, Answer) for a in out), out
    return out


def test_checkpoint_loads_with_identical_outputs(checkpoint):
    root, model = checkpoint
    pipe = build_pipeline(from_params(params(path=str(root))))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    loaded = pipe.engine.model
    assert loaded.spec.path == str(root) and "checkpoint" in pipe.describe()
    assert loaded.tokenizer is None  # no tokenizer files were saved
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids, use_cache=False).logits,
                           model(input_ids=ids, use_cache=False).logits)
    # the same seeded encoders/head on the in-memory model: the same actions, bit for bit
    reference = build_pipeline(from_params(params(seed=0)))
    with torch.no_grad():
        reference.engine.model.model.load_state_dict(model.state_dict())
    for a, b in zip(_answers(pipe), _answers(reference)):
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.position == b.position
    assert not pipe.policy_weights_loaded


def test_missing_files_are_named(checkpoint, tmp_path):
    root, _ = checkpoint
    no_config = _copy(root, tmp_path / "no_config", skip={"config.json"})
    with pytest.raises(ModelLoadError, match="config.json"):
        build_pipeline(from_params(params(path=str(no_config))))
    no_weights = _copy(root, tmp_path / "no_weights", skip={"model.safetensors"})
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        build_pipeline(from_params(params(path=str(no_weights))))
    # a policy file alone is not a backbone
    (no_weights / POLICY_WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        build_pipeline(from_params(params(path=str(no_weights))))
    with pytest.raises(ModelLoadError, match="not found"):
        build_pipeline(from_params(params(path=str(tmp_path / "nowhere"))))


def test_policy_weights_beside_checkpoint(checkpoint, tmp_path):
    root, _ = checkpoint
    ckpt = _copy(root, tmp_path / "with_policy")
    trained = build_pipeline(from_params(params(path=str(ckpt), seed=5)))  # other seeded weights
    modules = {"encoders.obs": trained.encoders["obs"], "head.s": trained.heads["s"]}
    save_policy_weights(modules, ckpt / POLICY_WEIGHTS_FILE)
    pipe = build_pipeline(from_params(params(path=str(ckpt), seed=0)))
    assert pipe.policy_weights_loaded and "loaded" in pipe.describe()
    for key, module in modules.items():
        kind, name = key.split(".")
        target = pipe.encoders[name] if kind == "encoders" else pipe.heads[name]
        for (k, a), (_, b) in zip(module.state_dict().items(), target.state_dict().items()):
            assert torch.equal(a, b), k
    # the backbone weights id ignores the policy file: capsules stay valid when it changes
    plain = build_pipeline(from_params(params(path=str(root))))
    assert plain.engine.model.fingerprint.weights == pipe.engine.model.fingerprint.weights


def test_tokenizer_beside_checkpoint(checkpoint, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    root, _ = checkpoint
    ckpt = _copy(root, tmp_path / "with_tokenizer")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "go": 10, "left": 11, "right": 12}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(ckpt)
    pipe = build_pipeline(from_params(params(
        path=str(ckpt), head={"kind": "tokens", "max_new_tokens": 4})))
    assert pipe.engine.model.tokenizer is not None
    assert pipe.encoders["instr"].token_ids(NS(data="go right")) == [10, 12]
    out = []
    pipe.on_message("instr", NS(data="go left"), 0, out.append)
    pipe.on_message("obs", NS(data=[0.1, 0.2, 0.3, 0.4]), 1, out.append)
    (answer,) = out
    ids = list(answer.output.token_ids)
    assert answer.output.text == pipe.engine.model.tokenizer.decode(ids, skip_special_tokens=True)
    assert 2 in pipe.engine.model.eos_token_ids
