"""The lean forward: one chunk of a Qwen3.5-text, Bamba or Nemotron-H hybrid, written out over the
live buffers.

transformers' modules stay the reference (and the CPU path); this is the same function with the
small stuff taken out: merged projections (the modules' weights become views of the merged
tensors, so no weight is stored twice), precomputed rotary tables (transformers' own rotary
embedding, evaluated once over every position), no mask tensors, no Python-side cache flags, and
the state kernels of ``capsule_ros.kernels.ops`` updating the live buffers in place.

Three ways to run it (``compile``), each its own execution path in the capsule fingerprint:
``"none"`` (PyTorch ops between the kernels), ``"glue"`` (the norms and SwiGLU each an
inductor-fused kernel) and ``"step"`` (the whole step one inductor graph around the state kernels,
which are ``torch.library`` custom ops, and flex attention; the conv is written as K shifted
products so it fuses too). Compilation happens on a chunk size's first run (the runner's probe, at
configure); its caches live where runtime/build.py points them.

``step(x, pos, n)`` appends the first ``n`` rows of ``x`` [T, hidden] at position ``pos``; both
are device scalars, so one captured graph per chunk size ``T`` serves every length 1..T and every
position. Rows past ``n`` are padding: zeroed on entry, written to K/V rows past the valid length
(never read by a valid query, overwritten by the next append), and made no-ops of every
recurrent and conv state update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..kernels import ops

# Matmuls of up to this many rows use the skinny Triton kernels on CUDA (kernels/skinny_mm.py);
# longer chunks, and every CPU step, use PyTorch's. 0: cuBLAS everywhere. Measured on an H200
# (bench/skinny_mm.py, bench/README.md): the skinny kernels lose to cuBLAS with 16 or 64 rows and
# win with one row by a small weight (2048 -> 1024: 2.4x), a per-shape choice not made yet.
SKINNY_MAX_ROWS = 0

LEAN_FAMILIES = ("qwen3_5_text", "bamba", "nemotron_h")
# How each family's RMSNorm rounds (see _rms)
NORM_STYLES = {"qwen3_5_text": "zero_centered", "bamba": "cast_then_weight",
               "nemotron_h": "weight_in_float32"}
FINAL_NORMS = {"qwen3_5_text": "norm", "bamba": "final_layernorm", "nemotron_h": "norm_f"}
COMPILE_MODES = ("none", "glue", "step")


def execution_name(compile: str) -> str:
    """The fingerprint's execution path of a compile mode (each fuses, so rounds, differently)."""
    return "lean-cuda" if compile == "none" else f"lean-cuda+{compile}"


def compile_mode_of(execution: str) -> str | None:
    """The compile mode an execution name asks for ("lean-cuda+step" -> "step"); None when it
    names no lean path ("graph")."""
    for mode in COMPILE_MODES:
        if execution_name(mode) == execution:
            return mode
    return None


def _merge(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight for several projections of the same input; the modules keep views of it."""
    merged = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = merged[start:start + rows]
        start += rows
    return merged


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float, style: str) -> torch.Tensor:
    """RMSNorm as the family writes it: "zero_centered" (Qwen3.5: (x * r) * (1 + w) in float32),
    "weight_in_float32" (Nemotron-H: w * (x * r) in float32), "cast_then_weight" (Bamba: w times
    (x * r) cast to the model dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if style == "zero_centered":
        return (xf * (1.0 + w.float())).to(x.dtype)
    if style == "weight_in_float32":
        return (w.float() * xf).to(x.dtype)
    return w * xf.to(x.dtype)


def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def _relu2(x: torch.Tensor) -> torch.Tensor:
    """Nemotron-H's MLP activation: relu(x) squared."""
    return torch.square(F.relu(x))


def _gdn_norm(o: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5 gated RMSNorm per value head: w * norm(o) (model dtype), times silu(z) in float32."""
    of = o.float()
    of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)
    return ((w * of.to(o.dtype)) * F.silu(z.float())).to(o.dtype)


def _mamba_norm(s: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    """BambaRMSNormGated: silu(gate) * s in float32, grouped RMS, then w * (model dtype)."""
    T = s.shape[0]
    sg = (s.float() * F.silu(gate.float())).view(T, -1, group)
    sg = sg * torch.rsqrt(sg.pow(2).mean(-1, keepdim=True) + eps)
    return w * sg.view(T, -1).to(s.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [1, H, T, D]; cos/sin [T, rot] (partial rotary: the first ``rot`` dims turn)."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)


def _mamba_mixer(m: Any) -> Any:
    """A transformers Mamba2 mixer (Bamba's, Nemotron-H's) checked for what the lean layer does,
    with A precomputed as the kernel wants it."""
    if m.in_proj.bias is not None or m.out_proj.bias is not None:
        raise ValueError("lean Mamba2 layer: projection biases are not supported")
    if getattr(m, "activation", "silu") != "silu":
        raise ValueError(f"lean Mamba2 layer: conv activation {m.activation!r}, not silu")
    m._lean_A = -torch.exp(m.A_log.float())
    lo, hi = (float(t) for t in m.time_step_limit)
    # A step-size clamp (Nemotron-H: softplus(dt + dt_bias) >= 0.001) is applied to the argument
    # of softplus instead (it is monotonic), in float32 and once for every path: mamba-ssm's
    # one-token update has no clamp, and a clamp after softplus would turn a padding row's
    # softplus(-inf) = 0 into a real step. None: no clamp (Bamba: 0 <= dt < inf).
    m._lean_dt_range = None
    if lo > 0 or hi < math.inf:
        m._lean_dt_range = (math.log(math.expm1(lo)) if lo > 0 else None,
                            math.log(math.expm1(hi)) if hi < math.inf else None)
        m._lean_no_bias = torch.zeros_like(m.dt_bias, dtype=torch.float32)
    return m


@dataclass
class _Layer:
    kind: str                 # "gdn" | "mamba" | "attn" | "mlp" (a feed-forward-only block)
    norm1: torch.Tensor
    norm2: torch.Tensor | None  # None: the block has no feed-forward after its mixer (Nemotron-H)
    w_in: torch.Tensor        # merged input projection (an "mlp" block: up)
    w_out: torch.Tensor       # (an "mlp" block: down)
    w_gate_up: torch.Tensor | None
    w_down: torch.Tensor | None
    mod: Any                  # the transformers mixer module (small parameters)
    state: dict[str, torch.Tensor]


class LeanModel:
    """The lean step over a bound ``HybridModel``'s weights and live buffers."""

    def __init__(self, hm: Any, use_cuda_kernels: bool | None = None, compile: str = "none") -> None:
        model = hm.model
        cfg = model.config
        self.kind = cfg.model_type
        if self.kind not in LEAN_FAMILIES:
            raise ValueError(f"no lean forward for {self.kind!r} (have {LEAN_FAMILIES})")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, not {compile!r}")
        self.hm = hm
        self.cfg = cfg
        self.device = hm.live.device
        self.dtype = getattr(torch, hm.spec.dtype)
        self.max_len = hm.max_len
        self.cuda = self.device.type == "cuda" if use_cuda_kernels is None else use_cuda_kernels
        self.attention = "flex" if self.cuda else "reference"
        self.skinny_rows = SKINNY_MAX_ROWS if self.cuda else 0
        self.norm_style = NORM_STYLES[self.kind]
        self.eps = cfg.layer_norm_epsilon if self.kind == "nemotron_h" else cfg.rms_norm_eps
        base = model.model
        self.final_norm = getattr(base, FINAL_NORMS[self.kind]).weight
        self.cos = self.sin = None  # Nemotron-H's attention has no positional encoding
        if hasattr(base, "rotary_emb"):
            with torch.no_grad():
                pos = torch.arange(self.max_len, device=self.device)[None]
                probe = torch.zeros(1, 1, cfg.hidden_size, dtype=self.dtype, device=self.device)
                cos, sin = base.rotary_emb(probe, pos)  # transformers' own tables, every position
            self.cos, self.sin = cos.reshape(self.max_len, -1), sin.reshape(self.max_len, -1)
        types = cfg.layer_types if self.kind == "qwen3_5_text" else cfg.layers_block_type
        # "glue": the elementwise chains (norms, SwiGLU, gated norms) each one compiled kernel per
        # shape; "step": everything but the state kernels in one compiled graph per chunk size.
        self.compile = compile
        wrap = (lambda f: torch.compile(f, dynamic=False)) if compile == "glue" else (lambda f: f)
        if compile != "none":
            from torch import _dynamo
            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
        self._compiled_steps: dict[tuple[int, str | None], Callable] = {}
        self.rms, self.swiglu = wrap(_rms), wrap(_swiglu)
        self.gdn_norm, self.mamba_norm = wrap(_gdn_norm), wrap(_mamba_norm)
        self.layers: list[_Layer] = []
        self._flex: dict[int, ops.FlexAttention] = {}
        with torch.no_grad():
            for i, (layer, t) in enumerate(zip(base.layers, types)):
                self.layers.append(self._bind_layer(i, layer, t, hm))

    def _bind_layer(self, i: int, layer: Any, t: str, hm: Any) -> _Layer:
        if self.kind == "nemotron_h":
            return self._bind_block(i, layer, t, hm)
        mlp = layer.mlp if self.kind == "qwen3_5_text" else layer.feed_forward
        norm2 = layer.post_attention_layernorm if self.kind == "qwen3_5_text" else layer.pre_ff_layernorm
        gate_up = _merge(mlp.gate_proj, mlp.up_proj)
        live = hm.live
        if t == "full_attention":
            a = layer.self_attn
            state = {"k": live.view(f"L{i}.k"), "v": live.view(f"L{i}.v")}
            return _Layer("attn", layer.input_layernorm.weight, norm2.weight,
                          _merge(a.q_proj, a.k_proj, a.v_proj), a.o_proj.weight, gate_up,
                          mlp.down_proj.weight, a, state)
        state = {"conv": live.view(f"L{i}.conv0"), "rec": live.view(f"L{i}.rec0")}
        if self.kind == "qwen3_5_text":
            m = layer.linear_attn
            w_in = _merge(m.in_proj_qkv, m.in_proj_z, m.in_proj_b, m.in_proj_a)
            return _Layer("gdn", layer.input_layernorm.weight, norm2.weight, w_in,
                          m.out_proj.weight, gate_up, mlp.down_proj.weight, m, state)
        m = _mamba_mixer(layer.mamba)
        return _Layer("mamba", layer.input_layernorm.weight, norm2.weight, m.in_proj.weight,
                      m.out_proj.weight, gate_up, mlp.down_proj.weight, m, state)

    def _bind_block(self, i: int, block: Any, t: str, hm: Any) -> _Layer:
        """A Nemotron-H block: norm, one mixer (Mamba2, attention or a feed-forward), residual."""
        m, norm = block.mixer, block.norm.weight
        if t == "full_attention":
            state = {"k": hm.live.view(f"L{i}.k"), "v": hm.live.view(f"L{i}.v")}
            return _Layer("attn", norm, None, _merge(m.q_proj, m.k_proj, m.v_proj), m.o_proj.weight,
                          None, None, m, state)
        if t == "linear_attention":
            state = {"conv": hm.live.view(f"L{i}.conv0"), "rec": hm.live.view(f"L{i}.rec0")}
            _mamba_mixer(m)
            return _Layer("mamba", norm, None, m.in_proj.weight, m.out_proj.weight, None, None, m, state)
        if t == "mlp" and m.up_proj.bias is None and m.down_proj.bias is None:
            return _Layer("mlp", norm, None, m.up_proj.weight, m.down_proj.weight, None, None, m, {})
        raise ValueError(f"lean nemotron_h: no lean {t!r} block (biased MLP or MoE)")

    # -- the step ------------------------------------------------------------------------------
    def attention_for(self, T: int, pos: torch.Tensor) -> Callable:
        """The attention of a chunk of T rows (one flex block mask per T, shared by every layer):
        ``attend(q, k_cache, v_cache, scale, pos)``. Flex reads ``pos`` through its block mask,
        so its position must be one fixed tensor; the reference takes each call's."""
        if self.attention != "flex":
            return lambda q, k, v, scale, pos: ops.attention_reference(q, k, v, pos, scale)
        if T not in self._flex:
            # inside a compiled step flex_attention is traced with it; alone it needs its own compile
            flex = ops.raw_flex() if self.compile == "step" else ops.compiled_flex()
            self._flex[T] = ops.FlexAttention(T, self.max_len, self.device, pos, flex)
        fa = self._flex[T]
        if fa.pos is not pos:
            raise RuntimeError("the lean step's position must be one fixed device tensor")
        return fa

    def step(self, x: torch.Tensor, pos: torch.Tensor, n: torch.Tensor, only: str | None = None
             ) -> torch.Tensor:
        """Append rows [0, n) of ``x`` [T, hidden] at ``pos``; returns hidden states [T, hidden]
        after the final norm (rows past n are padding). ``only`` ("gdn", "mamba" or "attn") runs
        just the layers of that kind ("mlp" too: Nemotron-H's feed-forward-only blocks): what
        bench/ttft.py times for its per-layer roofline."""
        T = x.shape[0]
        attend = self.attention_for(T, pos)  # built outside any compiled code
        if self.compile != "step":
            return self._step(x, pos, n, attend, only)
        if (T, only) not in self._compiled_steps:
            def one_chunk(x: torch.Tensor, pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
                return self._step(x, pos, n, attend, only)
            self._compiled_steps[T, only] = torch.compile(one_chunk, fullgraph=True, dynamic=False)
        return self._compiled_steps[T, only](x, pos, n)

    def _step(self, x: torch.Tensor, pos: torch.Tensor, n: torch.Tensor, attend: Callable,
              only: str | None) -> torch.Tensor:
        T = x.shape[0]
        rows = torch.arange(T, device=self.device)
        valid = rows < n                                   # [T]
        h = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        positions = pos + rows
        seq = torch.stack([torch.zeros_like(n), n])      # [0, n]: the rows a state kernel walks
        cos = sin = None
        if self.cos is not None:
            cos = self.cos.index_select(0, torch.clamp(positions, max=self.max_len - 1))
            sin = self.sin.index_select(0, torch.clamp(positions, max=self.max_len - 1))
        if isinstance(attend, ops.FlexAttention):
            attend.set_length(pos + n)
        for layer in self.layers:
            if only is not None and layer.kind != only:
                continue
            hn = self.rms(h, layer.norm1, self.eps, self.norm_style)
            if layer.kind == "attn":
                mix = self._attn(layer, hn, pos, positions, attend, cos, sin)
            elif layer.kind == "gdn":
                mix = self._gdn(layer, hn, valid, n, seq)
            elif layer.kind == "mamba":
                mix = self._mamba(layer, hn, valid, n)
            else:
                mix = self._mm(_relu2(self._mm(hn, layer.w_in)), layer.w_out)
            h = h + mix
            if layer.norm2 is not None:
                hn = self.rms(h, layer.norm2, self.eps, self.norm_style)
                h = h + self._mm(self.swiglu(self._mm(hn, layer.w_gate_up)), layer.w_down)
        return self.rms(h, self.final_norm, self.eps, self.norm_style)

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T``: the skinny kernels for a few rows on CUDA, PyTorch's otherwise."""
        if x.shape[0] <= self.skinny_rows:
            return ops.skinny_mm(x, w)
        return x @ w.t()

    def _conv(self, layer: _Layer, xbc: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv over [conv state | the chunk] + SiLU; the state becomes the last
        K inputs ending at row n (padding never enters it)."""
        m = layer.mod
        conv = layer.state["conv"]                         # [1, C, K]
        K = conv.shape[-1]
        xs = torch.cat([conv[0], xbc.t().to(conv.dtype)], dim=1)   # [C, K + T]
        w = m.conv1d.weight                                # [C, 1, K]
        if self.compile == "step":  # K shifted products in float32: one fused kernel with the rest
            T = xbc.shape[0]
            wf = w[:, 0].float()
            out = sum(wf[:, j:j + 1] * xs[:, 1 + j:1 + j + T].float() for j in range(K))
            if m.conv1d.bias is not None:
                out = out + m.conv1d.bias.float()[:, None]
        else:
            out = F.conv1d(xs[None].to(w.dtype), w, m.conv1d.bias, groups=xs.shape[0])[0, :, 1:]
        idx = n + torch.arange(K, device=xs.device)
        conv[0].copy_(xs.index_select(1, idx))
        return F.silu(out).to(xbc.dtype).t()               # [T, C]

    def _gdn(self, layer: _Layer, hn: torch.Tensor, valid: torch.Tensor, n: torch.Tensor,
             seq: torch.Tensor) -> torch.Tensor:
        m = layer.mod
        T = hn.shape[0]
        y = self._mm(hn, layer.w_in)
        qkv, z, b, a = torch.split(y, [m.conv_dim, m.value_dim, m.num_v_heads, m.num_v_heads], dim=-1)
        qkv = self._conv(layer, qkv, n)
        q, k, v = torch.split(qkv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
        ninf = torch.full((), float("-inf"), dtype=a.dtype, device=a.device)
        # padding rows: decay 1 and beta 0, no-op updates (the reference walks them)
        a = torch.where(valid[:, None], a, ninf)[None].contiguous()
        b = torch.where(valid[:, None], b, ninf)[None].contiguous()
        q = q.reshape(1, T, m.num_k_heads, m.head_k_dim).contiguous()
        k = k.reshape(1, T, m.num_k_heads, m.head_k_dim).contiguous()
        v = v.reshape(1, T, m.num_v_heads, m.head_v_dim).contiguous()
        o = ops.gdn_recurrent(q, k, v, a, b, m.A_log, m.dt_bias, layer.state["rec"], seq, self.cuda)
        o = o.reshape(T, m.num_v_heads, m.head_v_dim)
        if T > 1:  # fla's kernel stops at row n: padding rows hold whatever bits, NaN included
            o = torch.where(valid[:, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
        o = self.gdn_norm(o, z.reshape(T, m.num_v_heads, m.head_v_dim), m.norm.weight,
                          m.norm.variance_epsilon)
        return self._mm(o.to(hn.dtype).reshape(T, -1), layer.w_out)

    def _mamba(self, layer: _Layer, hn: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        m = layer.mod
        T = hn.shape[0]
        y = self._mm(hn, layer.w_in)
        gate, xbc, dt = torch.split(y, [m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        xbc = self._conv(layer, xbc, n)
        gs = m.n_groups * m.ssm_state_size
        x, B, C = torch.split(xbc, [m.intermediate_size, gs, gs], dim=-1)
        dt_bias = m.dt_bias
        if m._lean_dt_range is not None:  # the clamp on softplus's argument (see _mamba_mixer)
            dt = torch.clamp(dt.float() + dt_bias.float(), *m._lean_dt_range)
            dt_bias = m._lean_no_bias
        ninf = torch.full((), float("-inf"), dtype=dt.dtype, device=dt.device)
        dt = torch.where(valid[:, None], dt, ninf).contiguous()      # padding: softplus -> 0
        x = x.reshape(T, m.num_heads, m.head_dim)
        B = B.reshape(T, m.n_groups, m.ssm_state_size)
        C = C.reshape(T, m.n_groups, m.ssm_state_size)
        s = ops.ssm_update(x, dt, m._lean_A, B, C, m.D, dt_bias, layer.state["rec"], m.chunk_size,
                           self.cuda)
        s = self.mamba_norm(s.reshape(T, -1), gate, m.norm.weight, m.norm.group_size,
                            m.norm.variance_epsilon)
        return self._mm(s.to(hn.dtype), layer.w_out)

    def _attn(self, layer: _Layer, hn: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor,
              attend: Callable, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = layer.mod
        T = hn.shape[0]
        D = a.head_dim
        hq = self.cfg.num_attention_heads
        hkv = self.cfg.num_key_value_heads
        y = self._mm(hn, layer.w_in)
        qw = hq * D * (2 if self.kind == "qwen3_5_text" else 1)
        qg, k, v = torch.split(y, [qw, hkv * D, hkv * D], dim=-1)
        gate = None
        if self.kind == "qwen3_5_text":
            q, gate = torch.chunk(qg.view(T, hq, 2 * D), 2, dim=-1)
            gate = gate.reshape(T, -1)
            q = self.rms(q, a.q_norm.weight, a.q_norm.eps, "zero_centered")
            k = self.rms(k.view(T, hkv, D), a.k_norm.weight, a.k_norm.eps, "zero_centered")
        else:
            q, k = qg.view(T, hq, D), k.view(T, hkv, D)
        v = v.view(T, hkv, D)
        q, k = q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, heads, T, D]
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        kc, vc = layer.state["k"], layer.state["v"]         # [1, hkv, L, D]
        # Rows land at pos..pos+T-1; the runner never plans a chunk past the buffer's end.
        ops.write_rows(kc, k.to(kc.dtype), positions)      # in place, whatever compiles it
        ops.write_rows(vc, v.transpose(0, 1)[None].to(vc.dtype), positions)
        o = attend(q, kc, vc, a.scaling, pos)               # [1, hq, T, D]
        o = o[0].transpose(0, 1).reshape(T, hq * D)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self._mm(o, layer.w_out)
