"""The lean forward's math (models/lean.py) against transformers' modules, on CPU with the
PyTorch reference kernels: the same function, and padding rows that change nothing."""
from __future__ import annotations

import pytest
import torch

from capsule_ros.models import HybridModel, ModelSpec
from capsule_ros.models.lean import LeanModel
from capsule_ros.models.registry import tiny_config
from capsule_ros.runtime.graphs import plan_chunks

FAMILIES = ["qwen3_5_text", "bamba", "nemotron_h"]


def build(family: str) -> HybridModel:
    return HybridModel.load(ModelSpec(config_file=str(tiny_config(family)), max_len=64))


def views(m: HybridModel) -> dict[str, torch.Tensor]:
    return {s.name: m.live.view(s.name).clone() for s in m.live.layout.specs}


def empty(m: HybridModel) -> None:
    for r in m.live.regions.values():
        r.zero_()
    m.write_meta(m.empty_meta())


def lean_append(lean: LeanModel, x: torch.Tensor, start: int, chunk: int, garbage: int) -> torch.Tensor:
    buf = torch.randn(chunk, x.shape[1], generator=torch.Generator().manual_seed(garbage))
    buf[:x.shape[0]] = x
    return lean.step(buf, torch.tensor(start), torch.tensor(x.shape[0]))[:x.shape[0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_step_is_the_transformers_forward(family):
    m = build(family)
    x = torch.randn(17, m.hidden_size, generator=torch.Generator().manual_seed(1))
    ref = torch.cat([m.forward(x[:11]), m.forward(x[11:16]), m.forward(x[16:])])
    ref_state = views(m)
    empty(m)
    lean = LeanModel(m)
    assert lean.attention == "reference" and not lean.cuda
    with torch.no_grad():
        ours = torch.cat([lean_append(lean, x[:11], 0, 16, 0), lean_append(lean, x[11:16], 11, 16, 1),
                          lean_append(lean, x[16:], 16, 1, 2)])
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"hidden states differ: {rel:.3g} (float32)"
    for spec in m.live.layout.specs:
        got, want = m.live.view(spec.name), ref_state[spec.name]
        if spec.seq_axis is not None:  # attention K/V: the 17 valid rows
            got, want = got[:, :, :17], want[:, :, :17]
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{spec.name}: {err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_rows_change_nothing(family):
    m = build(family)
    lean = LeanModel(m)
    x = torch.randn(7, m.hidden_size, generator=torch.Generator().manual_seed(3))
    outs, states = [], []
    for garbage in (10, 11):
        empty(m)
        with torch.no_grad():
            outs.append(lean_append(lean, x, 0, 16, garbage))
        states.append(views(m))
    assert torch.equal(outs[0], outs[1])
    for spec in m.live.layout.specs:
        a, b = states[0][spec.name], states[1][spec.name]
        if spec.seq_axis is not None:
            a, b = a[:, :, :7], b[:, :, :7]
        assert torch.equal(a, b), spec.name


def test_chunk_plan_takes_any_length_in_one_replay_up_to_the_largest_chunk():
    chunks = (1, 16, 64, 512)
    assert plan_chunks(7, 100, chunks, 4096) == [(16, 7)]
    assert plan_chunks(32, 100, chunks, 4096) == [(64, 32)]
    assert plan_chunks(1, 100, chunks, 4096) == [(1, 1)]
    assert plan_chunks(1000, 0, chunks, 4096) == [(512, 512), (512, 488)]
    # near the end of the buffer no chunk reaches past it
    assert plan_chunks(7, 4085, chunks, 4096) == [(1, 1)] * 7
    assert plan_chunks(20, 4060, chunks, 4096) == [(16, 16), (16, 4)]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_step_compiled_whole_computes_the_uncompiled_step(family):
    """compile="step": one inductor graph per chunk size around the custom state ops (here their
    PyTorch references) and the conv written as shifted products; the same hidden states and
    state as the plain step, and its padding rows still change nothing."""
    m = build(family)
    x = torch.randn(17, m.hidden_size, generator=torch.Generator().manual_seed(1))
    runs = {}
    for mode, garbage in (("none", 0), ("step", 0), ("step", 5)):
        empty(m)
        lean = LeanModel(m, compile=mode)
        with torch.no_grad():
            out = torch.cat([lean_append(lean, x[:11], 0, 16, garbage),
                             lean_append(lean, x[11:16], 11, 16, garbage + 1),
                             lean_append(lean, x[16:], 16, 1, garbage + 2)])
        runs[mode, garbage] = out, views(m)
    (plain, plain_state), (fused, fused_state), (fused2, fused2_state) = runs.values()
    rel = ((fused - plain).norm() / plain.norm()).item()
    assert rel < 1e-5, f"compiled vs plain step (float32): {rel:.3g}"
    assert torch.equal(fused, fused2)
    for spec in m.live.layout.specs:
        got, want, again = fused_state[spec.name], plain_state[spec.name], fused2_state[spec.name]
        if spec.seq_axis is not None:
            got, want, again = got[:, :, :17], want[:, :, :17], again[:, :, :17]
        assert torch.equal(got, again), spec.name
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{spec.name}: {err:.3g}"


def test_every_cuda_step_the_node_accepts_names_a_lean_mode_or_the_graph_path():
    from capsule_ros.config import CUDA_STEPS
    from capsule_ros.models.lean import COMPILE_MODES, compile_mode_of, execution_name
    modes = {step: compile_mode_of(step) for step in CUDA_STEPS}
    assert modes == {"lean-cuda+step": "step", "lean-cuda+glue": "glue", "lean-cuda": "none",
                     "graph": None}
    assert all(execution_name(mode) == step for step, mode in modes.items() if mode is not None)
    assert set(COMPILE_MODES) == {m for m in modes.values() if m is not None}
