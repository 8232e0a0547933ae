"""Action heads, the token sampler's restorable randomness, and policy weight files."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from capsule_ros.policy.encoders import build_encoder
from capsule_ros.policy.heads import ContinuousActionHead, TokenSampler, build_head
from capsule_ros.policy.weights import PolicyWeightsError, load_policy_weights, save_policy_weights

HIDDEN = 16


def test_continuous_head_shape_range_and_seed():
    before = torch.get_rng_state()
    head = build_head({"head": "continuous", "horizon": 5, "dof": 3, "step_period": 0.1,
                       "scale": [1.0, 2.0, 0.5], "offset": 0.25}, HIDDEN, seed=1, name="front")
    assert torch.equal(torch.get_rng_state(), before)
    assert isinstance(head, ContinuousActionHead) and head.step_period == 0.1
    h = torch.randn(HIDDEN) * 100  # saturates tanh: the output reaches its configured range
    out = head(h)
    assert out.shape == (5, 3) and out.dtype == torch.float32
    span = (out - 0.25).abs().amax(dim=0)
    assert torch.all(span <= torch.tensor([1.0, 2.0, 0.5]) + 1e-6)
    same = ContinuousActionHead(HIDDEN, 5, 3, 0.1, seed=1, scale=[1.0, 2.0, 0.5], offset=0.25, name="front")
    assert torch.equal(same(h), out)
    assert head(h[None]).shape == (5, 3)  # [1, hidden] is accepted too
    linear = ContinuousActionHead(HIDDEN, 2, 4, 0.05, seed=0, mlp_ratio=0)
    assert linear(h.bfloat16()).shape == (2, 4)
    with pytest.raises(ValueError):
        build_head({"head": "continuous", "horizon": 5}, HIDDEN, 0)
    with pytest.raises(ValueError):
        build_head({"head": "diffusion"}, HIDDEN, 0)


def test_sampler_greedy_is_argmax():
    sampler = build_head({"head": "tokens"}, HIDDEN, 0)
    assert isinstance(sampler, TokenSampler) and sampler.greedy
    logits = torch.randn(50)
    assert sampler.pick(logits) == int(torch.argmax(logits))
    assert sampler.pick(logits[None]) == int(torch.argmax(logits))


def test_restored_generator_state_reproduces_samples():
    sampler = TokenSampler(temperature=1.0, top_p=0.9, seed=7)
    logits = torch.zeros(100)  # flat: every draw is decided by the generator alone
    gen = sampler.new_generator()
    [sampler.pick(logits, gen) for _ in range(3)]
    saved = gen.get_state()          # what the engine stores in the capsule
    first = [sampler.pick(logits, gen) for _ in range(20)]
    restored = torch.Generator()
    restored.set_state(saved)
    assert [sampler.pick(logits, restored) for _ in range(20)] == first
    assert len(set(first)) > 5       # really sampling, not greedy


def test_top_p_restricts_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    seen = {TokenSampler(1.0, 0.7).pick(logits, gen) for _ in range(300)}
    assert seen == {0, 1}                     # 0.5 < 0.7 <= 0.5 + 0.3
    seen = {TokenSampler(1.0, 0.1).pick(logits, gen) for _ in range(50)}
    assert seen == {0}                        # the top token always stays
    seen = {TokenSampler(1.0, 1.0).pick(logits, gen) for _ in range(2000)}
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        TokenSampler(1.0, 0.0)
    with pytest.raises(ValueError):
        TokenSampler(-1.0, 1.0)


# ---------------------------------------------------------------- weights

def _modules(seed: int) -> dict:
    return {
        "encoders.cam": build_encoder("cam", {"encoder": "image", "resize": [8, 8]}, HIDDEN, seed),
        "encoders.joints": build_encoder("joints", {"encoder": "joint_state", "joints": ["a", "b"]}, HIDDEN, seed),
        "head.front": build_head({"head": "continuous", "horizon": 2, "dof": 2, "step_period": 0.1},
                                 HIDDEN, seed, name="front"),
    }


def _outputs(mods: dict) -> list[torch.Tensor]:
    img = NS(height=8, width=8, encoding="mono8", is_bigendian=0, step=8,
             data=np.arange(64, dtype=np.uint8))
    h = torch.linspace(-1, 1, HIDDEN)
    with torch.no_grad():
        return [mods["encoders.cam"].encode(img),
                mods["encoders.joints"].encode(NS(name=["a", "b"], position=[0.5, -0.5])),
                mods["head.front"](h)]


def test_weights_round_trip(tmp_path):
    path = tmp_path / "policy.safetensors"
    trained = _modules(seed=1)
    save_policy_weights(trained, path)
    assert "encoders.cam.proj.weight" in load_file(path) and "head.front.net.0.bias" in load_file(path)
    fresh = _modules(seed=2)
    assert not all(torch.equal(a, b) for a, b in zip(_outputs(fresh), _outputs(trained)))
    assert load_policy_weights(fresh, path) is True
    assert all(torch.equal(a, b) for a, b in zip(_outputs(fresh), _outputs(trained)))
    assert load_policy_weights(fresh, None) is False
    assert load_policy_weights(fresh, tmp_path / "absent.safetensors") is False


def test_weights_errors_name_the_key_and_change_nothing(tmp_path):
    path = tmp_path / "policy.safetensors"
    save_policy_weights(_modules(seed=1), path)
    tensors = load_file(path)
    target = _modules(seed=2)
    before = _outputs(target)

    del tensors["head.front.net.2.weight"]
    save_file(tensors, path)
    with pytest.raises(PolicyWeightsError, match=r"head\.front\.net\.2\.weight"):
        load_policy_weights(target, path)

    tensors["head.front.net.2.weight"] = torch.zeros(3, HIDDEN)
    save_file(tensors, path)
    with pytest.raises(PolicyWeightsError, match=r"head\.front\.net\.2\.weight.*shape"):
        load_policy_weights(target, path)

    tensors["head.front.net.2.weight"] = torch.zeros(4, HIDDEN)
    tensors["encoders.cam.extra"] = torch.zeros(1)
    save_file(tensors, path)
    with pytest.raises(PolicyWeightsError, match=r"encoders\.cam\.extra"):
        load_policy_weights(target, path)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(target), before))  # nothing half-loaded

    del tensors["encoders.cam.extra"]
    tensors["encoders.other_input.proj.weight"] = torch.zeros(1)  # not configured: ignored
    save_file(tensors, path)
    assert load_policy_weights(target, path) is True
