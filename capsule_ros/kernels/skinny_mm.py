"""``x @ w.T`` for a few rows of ``x`` (the decode step, short appends): Triton kernels that stream
each weight once, at a fixed tiling.

Why: at one to sixteen rows the step is a chain of matrix-vector products over weights of a few
MB each, and cuBLAS's bf16 kernels moved them at well under a third of the card's bandwidth (a
1024x3584 product: 8.6 us on an H200, 0.85 TB/s; the lean step's layers ran at 0.5-0.8 TB/s).

Two kernels, both accumulating in float32 and writing the input's dtype:
* one row: each program reads a [BLOCK_N, BLOCK_K] tile of ``w`` per step and reduces it against
  the row on the CUDA cores (no tensor-core staging for a single row);
* 2-64 rows: the same walk over ``w`` with ``tl.dot`` against the rows, padded to 16 or 64
  (float32 inputs multiply in full precision, never TF32: the float32 path is the reference).

The tiling is a function of the shape only (no autotuning): the order of the float32 sums, so the
rounding, is the same in every process, which keeps a capsule written before a restart
bit-comparable with one recomputed after it.
"""
from __future__ import annotations

import torch

MAX_ROWS = 64  # above this, cuBLAS's GEMM is the right kernel


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def tiling(rows: int, n: int, k: int) -> dict[str, int]:
    """Block sizes for ``rows`` x ``k`` times ``k`` x ``n`` (see the module docstring)."""
    if rows == 1:
        # enough programs to cover the SMs twice over, even for the 1024-wide outputs
        return {"BLOCK_M": 1, "BLOCK_N": 8 if n >= 4096 else 4,
                "BLOCK_K": min(512, _next_pow2(k)), "num_warps": 4, "num_stages": 3}
    block_m = 16 if rows <= 16 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 32 if n >= 4096 else 16,
            "BLOCK_K": 128 if block_m == 16 else 64, "num_warps": 4, "num_stages": 3}


def skinny_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for x [M, K] (M <= MAX_ROWS), w [N, K], both contiguous along K."""
    import triton

    from .skinny_mm_triton import row_kernel, rows_kernel
    M, K = x.shape
    N = w.shape[0]
    if M > MAX_ROWS or w.shape[1] != K or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"skinny_mm: x {tuple(x.shape)} w {tuple(w.shape)} (rows <= {MAX_ROWS}, "
                         "contiguous along K)")
    t = tiling(M, N, K)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, t["BLOCK_N"]),)
    if M == 1:
        row_kernel[grid](x, w, y, N, K, w.stride(0), BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"],
                         num_warps=t["num_warps"], num_stages=t["num_stages"])
    else:
        rows_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                          BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"],
                          PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                          num_warps=t["num_warps"], num_stages=t["num_stages"])
    return y
