"""The state-updating kernels of the lean forward, each with a PyTorch reference.

Every op updates its state buffer **in place** and takes the chunk's real length through its
inputs, never through a Python number, so one captured graph per chunk size serves every length:
padded rows are made no-ops of the state update by the caller (gated-delta rule: ``a = b = -inf``
gives decay exp(0) = 1 and beta = 0; Mamba2: ``dt = -inf`` gives softplus = 0, so no decay and no
input). CUDA versions: fla-core 0.6.0's fused recurrent gated-delta kernel (gating, beta sigmoid
and q/k l2norm inside, initial and final state the same buffer); mamba-ssm's Triton
``selective_state_update`` (one token) and ``mamba_chunk_scan_combined`` (several); PyTorch's
``flex_attention`` with a block mask whose block count is a device tensor.

The state ops are also registered as ``torch.library`` custom ops (``capsule_ros::gdn_recurrent``,
``capsule_ros::ssm_update``), as are the K/V row write and the few-row matmul
(``capsule_ros::write_rows``, ``capsule_ros::skinny_mm``): opaque to inductor, so the whole lean
step can be compiled around them (models/lean.py, ``compile="step"``) with the Triton kernels
launched as they are.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F


# -- gated-delta rule ------------------------------------------------------------------------
def gdn_recurrent_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                            b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                            state: torch.Tensor) -> torch.Tensor:
    """q, k [1, T, H, K]; v [1, T, HV, V]; a, b [1, T, HV] raw; state [1, HV, K, V] (in place).

    g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b), q/k l2-normalised, q scaled by
    K^-0.5 (what transformers' Qwen3.5 layer computes around its kernel)."""
    _, T, H, K = k.shape
    HV = v.shape[2]
    rep = HV // H
    qf = q.float().repeat_interleave(rep, dim=2)
    kf = k.float().repeat_interleave(rep, dim=2)
    qf = qf / torch.sqrt((qf * qf).sum(-1, keepdim=True) + 1e-6) * K ** -0.5
    kf = kf / torch.sqrt((kf * kf).sum(-1, keepdim=True) + 1e-6)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    beta = torch.sigmoid(b.float())
    h = state[0].float()
    out = torch.empty(T, HV, v.shape[-1], dtype=torch.float32, device=v.device)
    for t in range(T):
        h = h * g[0, t].exp()[:, None, None]
        kv = (h * kf[0, t][:, :, None]).sum(1)
        delta = (v[0, t].float() - kv) * beta[0, t][:, None]
        h = h + kf[0, t][:, :, None] * delta[:, None, :]
        out[t] = (h * qf[0, t][:, :, None]).sum(1)
    state[0].copy_(h)
    return out[None].to(v.dtype)


def gdn_recurrent_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                       state: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """fla-core 0.6.0's fused recurrent kernel, launched with the state as initial and final state
    (each program reads and writes only its own tile), gating and beta sigmoid in the kernel.

    ``seq`` = [0, n] on the device, given as the kernel's one variable-length sequence: its
    token loop stops at row n, so a chunk's padding rows cost no steps. Their outputs are left
    unwritten (the caller masks them)."""
    import triton
    from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd_kernel
    _, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    BK = triton.next_power_of_2(K)
    BV = min(8, triton.next_power_of_2(V))
    o = torch.empty_like(v)
    fused_recurrent_gated_delta_rule_fwd_kernel[(triton.cdiv(V, BV) * HV,)](
        q=q, k=k, v=v, g=a, gk=None, gv=None, beta=b, A_log=A_log, dt_bias=dt_bias, o=o,
        h0=state, ht=state, cu_seqlens=seq, scale=K ** -0.5, T=T, H=H, HV=HV, K=K, V=V,
        BK=BK, BV=BV, IS_BETA_HEADWISE=True, USE_QK_L2NORM_IN_KERNEL=True,
        APPLY_BETA_SIGMOID=True, ALLOW_NEG_EIGVAL=False, STATE_V_FIRST=False,
        num_warps=1, num_stages=3)
    return o


# -- Mamba2 ----------------------------------------------------------------------------------
def ssm_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                  state: torch.Tensor) -> torch.Tensor:
    """x [T, H, P], dt [T, H] raw, A [H] (negative), B/C [T, G, N], D [H]; state [1, H, P, N].
    Step size softplus(dt + dt_bias), unclamped: a family's clamp is applied by the caller to
    softplus's argument (models/lean._mamba_mixer), as mamba-ssm's one-token kernel has none."""
    T, Hh, P = x.shape
    G = B.shape[1]
    rep = Hh // G
    d = F.softplus(dt.float() + dt_bias.float())
    Bf = B.float().repeat_interleave(rep, dim=1)
    Cf = C.float().repeat_interleave(rep, dim=1)
    h = state[0].float()
    out = torch.empty(T, Hh, P, dtype=torch.float32, device=x.device)
    for t in range(T):
        dA = torch.exp(d[t] * A.float())                                    # [H]
        h = h * dA[:, None, None] + (d[t][:, None] * x[t].float())[:, :, None] * Bf[t][:, None, :]
        out[t] = (h * Cf[t][:, None, :]).sum(-1) + D.float()[:, None] * x[t].float()
    state[0].copy_(h)
    return out.to(x.dtype)


def ssm_cuda(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
             state: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """mamba-ssm Triton: ``selective_state_update`` in place for one token, the chunked scan with
    the state as initial state (then copied back) for several."""
    T, Hh, P = x.shape
    N = B.shape[-1]
    if T == 1:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        y = selective_state_update(
            state, x, dt[:, :, None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N),
            B, C, D=D[:, None].expand(-1, P), z=None, dt_bias=dt_bias[:, None].expand(-1, P),
            dt_softplus=True)
        return y
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    y, final = mamba_chunk_scan_combined(
        x[None], dt[None], A, B[None], C[None], chunk_size=chunk_size, D=D, z=None,
        dt_bias=dt_bias, initial_states=state, dt_softplus=True, return_final_states=True)
    state.copy_(final)
    return y[0]


# -- the state ops as custom ops (inductor compiles around them) -------------------------------
@torch.library.custom_op("capsule_ros::gdn_recurrent", mutates_args=("state",))
def gdn_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                  state: torch.Tensor, seq: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """The gated-delta rule over rows [0, n) (``seq`` = [0, n]): fla's kernel when ``use_kernel``
    (CUDA), else the reference, which walks every row (padding rows are no-op updates there).
    Outputs of rows past n are unspecified."""
    if use_kernel:
        return gdn_recurrent_cuda(q, k, v, a, b, A_log, dt_bias, state, seq)
    return gdn_recurrent_reference(q, k, v, a, b, A_log, dt_bias, state)


@gdn_recurrent.register_fake
def _gdn_recurrent_shape(q, k, v, a, b, A_log, dt_bias, state, seq, use_kernel):
    return v.new_empty(v.shape)


@torch.library.custom_op("capsule_ros::ssm_update", mutates_args=("state",))
def ssm_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
               chunk_size: int, use_kernel: bool) -> torch.Tensor:
    """The Mamba2 state update: mamba-ssm's Triton kernels when ``use_kernel``, else the reference."""
    if use_kernel:
        y = ssm_cuda(x, dt, A, B, C, D, dt_bias, state, chunk_size=chunk_size)
    else:
        y = ssm_reference(x, dt, A, B, C, D, dt_bias, state)
    return y.reshape(x.shape)  # both kernels write a new output tensor


@ssm_update.register_fake
def _ssm_update_shape(x, dt, A, B, C, D, dt_bias, state, chunk_size, use_kernel):
    return x.new_empty(x.shape)  # the kernels return a contiguous output


@torch.library.custom_op("capsule_ros::write_rows", mutates_args=("cache",))
def write_rows(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
    """``cache[:, :, positions] = rows`` in place (cache [1, H, L, D], a view of the live K/V
    region). An opaque op: inductor's own index_put on a view of that shared region copied the
    layer's whole K (and V) buffer out and back on every step, max_len rows, not one."""
    cache.index_copy_(2, positions, rows)


@torch.library.custom_op("capsule_ros::skinny_mm", mutates_args=())
def skinny_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a few rows of x on CUDA: the fixed-tiling Triton kernels of
    kernels/skinny_mm.py (an op of its own, so a compiled step launches it as it is)."""
    from .skinny_mm import skinny_mm as kernel
    return kernel(x if x.stride(-1) == 1 else x.contiguous(), w)


@skinny_mm.register_fake
def _skinny_mm_shape(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


# -- attention -------------------------------------------------------------------------------
def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, Hq, T, D] at positions pos..pos+T-1 over the cache [1, Hkv, L, D]: causal, GQA."""
    T, L = q.shape[2], k_cache.shape[2]
    allowed = torch.arange(L, device=q.device)[None, :] <= (pos + torch.arange(T, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=allowed[None, None],
                                          scale=scale, enable_gqa=True)


class FlexAttention:
    """flex_attention over the whole cache with a block mask whose per-query-block KV block count
    is a device tensor set from (pos + n) inside the captured step: cost follows the valid length,
    one graph for every length, no mask tensor, GQA packed (no repeat_kv)."""

    KV_BLOCK = 128

    def __init__(self, T: int, L: int, device: torch.device, pos: torch.Tensor, compiled: Callable) -> None:
        from torch.nn.attention.flex_attention import BlockMask
        self.T, self.L = T, L
        q_block = 128
        n_q = math.ceil(T / q_block)
        self.max_blocks = math.ceil(L / self.KV_BLOCK)
        self.kv_num_blocks = torch.ones(1, 1, n_q, dtype=torch.int32, device=device)
        kv_indices = torch.arange(self.max_blocks, dtype=torch.int32, device=device).expand(1, 1, n_q, -1).contiguous()
        self.pos = pos

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + pos
        self.block_mask = BlockMask.from_kv_blocks(self.kv_num_blocks, kv_indices,
                                                   BLOCK_SIZE=(q_block, self.KV_BLOCK), mask_mod=causal,
                                                   seq_lengths=(T, L))
        self.compiled = compiled
        # Small-query appends: 16-row query tiles (measured faster than flex's default for 32 rows).
        self.kernel_options = {"BLOCK_M": 16} if 1 < T <= 64 else None

    def set_length(self, end: torch.Tensor) -> None:
        """Blocks to read: those holding rows [0, end) (end = pos + n, a device scalar)."""
        blocks = torch.clamp((end + self.KV_BLOCK - 1) // self.KV_BLOCK, max=self.max_blocks)
        self.kv_num_blocks.copy_(blocks.to(torch.int32).expand_as(self.kv_num_blocks))

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                 pos: torch.Tensor | None = None) -> torch.Tensor:
        """``pos`` is read through the block mask (the tensor given at construction)."""
        kw: dict[str, Any] = {"kernel_options": self.kernel_options} if self.kernel_options else {}
        return self.compiled(q, k_cache, v_cache, block_mask=self.block_mask, scale=scale,
                             enable_gqa=True, **kw)


_COMPILED_FLEX: Callable | None = None


def raw_flex() -> Callable:
    """flex_attention itself, for code that is compiled as a whole."""
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention


def compiled_flex() -> Callable:
    """One ``torch.compile``d flex_attention per process (inductor; no cudagraph trees)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch import _dynamo
        from torch.nn.attention.flex_attention import flex_attention
        # one specialisation per (chunk size, head dim, dtype): more than dynamo's default 8
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _COMPILED_FLEX
