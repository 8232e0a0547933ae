"""bench/ttft.py's kernel classes, on kernel names an H200 profile of the lean step reported."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ttft import kernel_kind  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_8x64_64x16_2x1_v_bz_TNN", "matmul"),               # cuBLAS on sm90
    ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "matmul"),
    ("fused_recurrent_gated_delta_rule_fwd_kernel", "gated delta rule"),  # fla
    ("_selective_scan_update_kernel", "mamba2 state"),                   # mamba-ssm
    ("_bmm_chunk_fwd_kernel", "mamba2 state"),
    ("triton_red_fused__to_copy_add_as_strided_clamp_expand_flex_attention_floor_divide_sub_32",
     "attention"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_silu_split_with_sizes_view_11",
     "inductor fused"),                                                  # a cast fused, not a copy
    ("void at::native::index_elementwise_kernel<128, 4, at::native::index_copy_kernel_impl<>>",
     "copy / fill"),
    ("Memcpy DtoD (Device -> Device)", "copy / fill"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, ArgMaxOps>>",
     "other"),
])
def test_h200_kernel_names_fall_in_their_kind(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


def test_matmul_shapes_names_each_product_with_its_shapes_and_calls() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ttft import matmul_shapes
    x, w, b = torch.randn(1, 64), torch.randn(256, 64), torch.randn(1, 256)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            x @ w.t()
        torch.addmm(b, x, w.t())
        torch.relu(x)
    rows = {(r["op"], r["shapes"]): r["calls"] for r in matmul_shapes(prof)}
    assert rows == {("aten::mm", "[[1, 64], [64, 256]]"): 3,
                    ("aten::addmm", "[[1, 256], [1, 64], [64, 256], [], []]"): 1}
