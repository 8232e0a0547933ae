"""The node-facing contract on CUDA: warm_up() captures everything, serving captures nothing.

Also: CPU models keep PyTorch kernels with the GPU kernels installed, and the fingerprint names
the execution path.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from capsule_ros.config import load_yaml
from capsule_ros.models import HybridModel, ModelSpec
from capsule_ros.runtime.engine import Engine
from capsule_ros.runtime.build import build_pipeline
from capsule_ros.runtime.outcome import Answer
from capsule_ros.status_codes import CapsuleRosError

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
BAG = ROOT / "test" / "data" / "demo_bag"


def cuda_config():
    config = load_yaml(ROOT / "config" / "default.yaml")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, device="cuda"))


def test_pipeline_serves_the_demo_bag_with_no_capture_after_warm_up():
    from capsule_ros.offline import run_offline
    from capsule_ros.ros.bag_io import read_messages
    config = cuda_config()
    pipeline = build_pipeline(config)
    model = pipeline.engine.model
    assert model.runner is not None, "the default config on CUDA runs graph-bound"
    info = model.warm_up(max_tokens=pipeline.engine.chunk_size)
    assert info["captures"] == model.captures > 0
    before = model.captures
    outcomes = run_offline(config, BAG, pipeline)
    triggers = {config.inputs[s.trigger].topic for s in config.streams.values()}
    n_triggers = sum(1 for m in read_messages(BAG) if m.topic in triggers)
    answers = [o for o in outcomes if isinstance(o, Answer)]
    assert len(answers) == n_triggers > 0
    assert model.runner.replays > 0
    assert model.captures == before, "a capture happened on the query path after warm_up()"


def test_warm_up_leaves_the_live_state_and_metadata_as_they_were():
    m = HybridModel.load(ModelSpec(config_file=str(ROOT / "config/models/default_qwen3_5.json"),
                                   device="cuda", max_len=1024))
    m.enable_graphs(max_chunk=16)
    e = Engine(m, chunk_size=16)
    e.add_stream("a")
    g = torch.Generator(device="cuda").manual_seed(0)
    e.query("a", torch.randn(21, m.hidden_size, device="cuda", generator=g), act=lambda h: None)
    e.commit()
    state = {k: r.clone() for k, r in m.live.regions.items()}
    meta = m.read_meta()
    info = m.warm_up(max_tokens=16)
    # chunks 1..16 from empty (5) and continuing at windows 256, 512, 1024 (5 x 3)
    assert info["variants"] == 20 and m.captures == 20
    assert m.read_meta() == meta
    for k, r in m.live.regions.items():
        assert torch.equal(r, state[k]), k
    captures = m.captures
    x = torch.randn(16 + 4 + 1, m.hidden_size, device="cuda", generator=g)
    e.query("a", x, act=lambda h: None)  # 16 + 4 + 1 continuing at position 21
    e.commit()
    assert m.captures == captures


def test_fingerprint_names_the_execution_path_and_refuses_a_crossing():
    spec = ModelSpec(config_file=str(ROOT / "config/models/default_qwen3_5.json"), device="cuda",
                     max_len=256)
    eager = HybridModel.load(spec)
    graph = HybridModel.load(spec)
    graph.enable_graphs(max_chunk=16)
    assert (eager.execution, graph.execution) == ("eager", "graph")
    assert eager.fingerprint.diff(graph.fingerprint) == ["execution"]
    e_eager, e_graph = Engine(eager), Engine(graph)
    e_eager.add_stream("a")
    e_eager.query("a", torch.randn(8, eager.hidden_size, device="cuda"), act=lambda h: None)
    e_eager.commit()
    with pytest.raises(CapsuleRosError, match="execution"):
        e_graph.add_stream("b", base=e_eager.boundary("a"))


@pytest.mark.parametrize("config", ["tiny_qwen3_5_text.json", "tiny_bamba.json"])
def test_cpu_model_uses_pytorch_kernels_with_the_gpu_kernels_installed(config):
    """With fla / mamba-ssm importable, a CPU model must not send CPU tensors to Triton."""
    path = str(ROOT / "config" / "models" / config)
    cpu = HybridModel.load(ModelSpec(config_file=path, device="cpu", max_len=64))
    gpu = HybridModel.load(ModelSpec(config_file=path, device="cuda", max_len=64))
    x = torch.randn(9, cpu.hidden_size, generator=torch.Generator().manual_seed(0))
    outs = {}
    for name, m in (("cpu", cpu), ("cuda", gpu)):
        h = [m.forward(x[:8].to(m.live.device)), m.forward(x[8:].to(m.live.device))]  # chunk + decode
        outs[name] = torch.cat(h).float().cpu()
    rel = (outs["cpu"] - outs["cuda"]).norm() / outs["cuda"].norm()
    assert rel < 1e-3, f"CPU (PyTorch kernels) vs CUDA (fused kernels), float32: {rel:.3g}"
