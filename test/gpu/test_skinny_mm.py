"""The few-row matmul kernels (kernels/skinny_mm.py) against a float64 product, on the GPU."""
from __future__ import annotations

import pytest
import torch

from capsule_ros.kernels import ops
from capsule_ros.kernels.skinny_mm import MAX_ROWS, skinny_mm

pytestmark = pytest.mark.gpu
# (N, K): the bench models' projections (1024 wide: qwen3_5_text, bamba) and ragged edges
SHAPES = [(7168, 1024), (1024, 3584), (8224, 1024), (1000, 136), (37, 520)]


@pytest.mark.parametrize("rows", [1, 7, 16, 33, MAX_ROWS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_skinny_mm_matches_a_float64_product(rows: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(rows)
    for n, k in SHAPES:
        x = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
        w = torch.randn(n, k, device="cuda", generator=g).to(dtype)
        want = x.double() @ w.double().t()
        got = skinny_mm(x, w)
        assert got.shape == (rows, n) and got.dtype == dtype
        if dtype == torch.bfloat16:  # the output's rounding dominates: 2^-8 relative
            tol, scale = 2 ** -7, want.abs().clamp_min(1.0)
        else:
            # a float32 sum's error grows with the sum of |terms| (~sqrt(K) * 2^-24 of it, K <= 3584:
            # below 4e-6), not with the result, which cancels; TF32 inputs would give ~2e-5 and more
            tol, scale = 1e-5, x.double().abs() @ w.double().abs().t()
        err = ((got.double() - want).abs() / scale).max().item()
        assert err < tol, (n, k, err)


def test_skinny_mm_is_deterministic_and_captures() -> None:
    """Same inputs, same bits, eager or replayed from a CUDA graph (the fixed tiling)."""
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(7168, 1024, device="cuda", dtype=torch.bfloat16)
    eager = ops.skinny_mm(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.skinny_mm(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(ops.skinny_mm(x, w), eager)


def test_skinny_mm_refuses_more_rows_than_it_tiles() -> None:
    x = torch.randn(MAX_ROWS + 1, 64, device="cuda")
    with pytest.raises(ValueError, match="rows"):
        skinny_mm(x, torch.randn(8, 64, device="cuda"))
