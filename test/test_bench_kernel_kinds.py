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


# Per-name totals of an H200 profile of the qwen3_5_text decode step (e7282fe), trimmed: with the
# CPU side recorded, inductor's range around its compiled graph came back among the CUDA events.
H200_NAMES = {
    "## Call CompiledFxGraph fcky5xp33njl4vy2ssw7amfafmukdyl2qktviztw4x3mnoyfspvl ##": (1, 31947.7),
    "nvjet_sm90_tst_8x64_64x16_2x1_v_bz_TNN": (24, 282.2),
    "fused_recurrent_gated_delta_rule_fwd_kernel": (18, 56.2),
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, ArgMaxOps>>": (1, 8.2),
}


def test_summarize_counts_kernels_not_the_compiled_graphs_annotation() -> None:
    from ttft import summarize
    s = summarize(H200_NAMES)
    assert s["kernels"] == 43            # 24 + 18 + 1
    assert s["gpu_us"] == 346.6          # 282.2 + 56.2 + 8.2
    assert s["by_kind"] == {"matmul": {"kernels": 24, "us": 282.2},
                            "gated delta rule": {"kernels": 18, "us": 56.2},
                            "other": {"kernels": 1, "us": 8.2}}
    assert [t["name"][:6] for t in s["top_kernels"]] == ["nvjet_", "fused_", "void a"]


def test_a_stored_profile_is_resummarized_from_its_own_kernel_list() -> None:
    from ttft import resummarize
    stored = {"model": "qwen3_5_text", "rows": 1, "kernels": 44, "gpu_us": 32294.3,
              "by_kind": {"other": {"kernels": 2, "us": 31955.9}}, "products": [],
              "top_kernels": [{"name": k, "kernels": n, "us": us} for k, (n, us) in H200_NAMES.items()]}
    fixed = resummarize(stored)
    assert (fixed["kernels"], fixed["gpu_us"]) == (43, 346.6)
    assert fixed["by_kind"]["other"] == {"kernels": 1, "us": 8.2}
    assert fixed["model"] == "qwen3_5_text" and fixed["products"] == []


@pytest.mark.parametrize("policy, rows, n, k, skinny", [
    ("small-one-row", 1, 1024, 2048, True),     # qwen's GDN out / attention o projection
    ("small-one-row", 1, 1536, 1024, True),     # bamba's attention qkv
    ("small-one-row", 1, 1024, 3072, False),    # bamba's down projection: 3M elements
    ("small-one-row", 1, 7168, 1024, False),    # qwen's merged gate/up
    ("small-one-row", 16, 1024, 2048, False),   # a 16-row chunk stays on cuBLAS
    ("skinny", 64, 7168, 1024, True),
    ("skinny", 65, 1024, 1024, False),
    ("cublas", 1, 1024, 1024, False),
])
def test_skinny_bench_policies_pick_products_by_rows_and_weight_size(policy, rows, n, k, skinny) -> None:
    from skinny_mm import uses_skinny
    assert uses_skinny(policy, rows, n, k) is skinny


def test_an_unknown_matmul_policy_is_refused() -> None:
    from skinny_mm import uses_skinny
    with pytest.raises(ValueError, match="unknown matmul policy"):
        uses_skinny("fastest", 1, 1024, 1024)
