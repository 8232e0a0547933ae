"""CPU side of the node-facing contract: warm_up() is cheap, captures nothing, changes nothing;
CPU tensors are routed to transformers' PyTorch kernels even where a fast package is installed."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from capsule_ros.models import HybridModel, ModelSpec
from capsule_ros.models.registry import tiny_config
from capsule_ros.models.torch_kernels import route_module
from capsule_ros.runtime.engine import Engine


def test_warm_up_on_cpu_captures_nothing_and_leaves_the_state_alone():
    m = HybridModel.load(ModelSpec(config_file=str(tiny_config("qwen3_5_text")), max_len=64))
    e = Engine(m, chunk_size=8)
    e.add_stream("a")
    e.query("a", torch.randn(11, m.hidden_size, generator=torch.Generator().manual_seed(0)),
            act=lambda h: None)
    e.commit()
    state = {k: r.clone() for k, r in m.live.regions.items()}
    meta = m.read_meta()
    info = m.warm_up(max_tokens=8)
    assert (info["captures"], m.captures, info["variants"], info["execution"]) == (0, 0, 0, "eager")
    assert m.read_meta() == meta
    for k, r in m.live.regions.items():
        assert torch.equal(r, state[k]), k


def test_cpu_calls_reach_the_reference_and_device_calls_the_kernel(monkeypatch):
    from transformers.integrations import use_kernel_func_from_hub_with_fallback
    fast = types.ModuleType("capsule_ros_fake_fast")

    def fused_op(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # a GPU-only kernel
        raise RuntimeError(f"Triton kernel got a {x.device.type} tensor")
    fast.fused_op = fused_op
    monkeypatch.setitem(sys.modules, "capsule_ros_fake_fast", fast)
    modeling = types.ModuleType("capsule_ros_fake_modeling")
    monkeypatch.setitem(sys.modules, "capsule_ros_fake_modeling", modeling)

    def fused_op_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x * scale
    fused_op_reference.__module__ = modeling.__name__
    modeling.fused_op = use_kernel_func_from_hub_with_fallback("fused_op", "capsule_ros_fake_fast")(
        fused_op_reference)
    x = torch.arange(3.0)
    with pytest.raises(RuntimeError, match="cpu tensor"):  # what transformers does by itself
        modeling.fused_op(x, scale=2.0)
    assert route_module(modeling) == ["fused_op"]
    assert torch.equal(modeling.fused_op(x, scale=2.0), torch.tensor([0.0, 2.0, 4.0]))
    with pytest.raises(RuntimeError, match="meta tensor"):  # other devices keep the kernel
        modeling.fused_op(torch.empty(3, device="meta"))
    assert route_module(modeling) == []  # idempotent
