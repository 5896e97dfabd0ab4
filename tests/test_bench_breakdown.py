"""bench/breakdown.py on CPU: the dry run (through ``ostquant bench breakdown``) profiles a tiny
layer and writes nothing; the kernel/op -> category rules; the per-category summary."""
from __future__ import annotations

import pytest
import torch

from bench import breakdown as bd

GEMM_KERNELS = [
    "void ostquant::(anonymous namespace)::w4a4_small_m_kernel<4>(unsigned char const*, "
    "unsigned char const*, int, long, long, long, ostquant::gemm::GemmEpilogue, int*)",
    "void ostquant::(anonymous namespace)::w4a4_split_reduce_kernel(int const*, int, long)",
    "void ostquant::(anonymous namespace)::w4a4_epilogue_kernel(int const*, long, long)",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_"
    "execute_segment_k_off_kernel__5x_cublas",
    "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, "
    "int, int>, cutlass::gemm::collective::CollectiveMma<...>>>(...)",
    "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn",
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT",
]
CASES = [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, "
     "false, cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, "
     "cutlass::bfloat16_t>>, false, true>(Flash_fwd_params)", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<"
     "cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
     "attention"),
    ("void ostquant::(anonymous namespace)::kv_attn_mma_kernel<__nv_bfloat16, 128>"
     "(ostquant::(anonymous namespace)::AttnParams)", "attention"),
    ("void ostquant::(anonymous namespace)::kv_attn_combine_kernel<__nv_bfloat16, 128>"
     "(float const*, float const*, __nv_bfloat16*, long, int)", "attention"),
    ("void ostquant::(anonymous namespace)::kv_append_kernel<__nv_bfloat16, 128>"
     "(ostquant::KvAppendArgs)", "kv_append"),
    ("void ostquant::(anonymous namespace)::row_quant_kernel<__nv_bfloat16, 4, true>(...)",
     "act_quant"),
    ("void ostquant::(anonymous namespace)::rmsnorm_quant_kernel<__nv_bfloat16>(...)",
     "act_quant"),
    ("void ostquant::(anonymous namespace)::hadamard_quant_kernel<__nv_bfloat16, 4>(...)",
     "act_quant"),
    ("void ostquant::(anonymous namespace)::pack_int4_kernel(signed char const*, "
     "unsigned char*, long)", "act_quant"),
    ("void ostquant::(anonymous namespace)::hadamard_kernel<__nv_bfloat16, 128>"
     "(ostquant::HadamardParams)", "hadamard"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add"
     "<c10::BFloat16>, std::array<char*, 3ul>>(int, at::native::CUDAFunctor_add<c10::BFloat16>,"
     " std::array<char*, 3ul>)", "other"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "attention"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("aten::mul", "other"),
]


@pytest.mark.parametrize("name", GEMM_KERNELS)
def test_gemm_kernel_names_are_gemm(name):
    assert bd.categorize(name) == "gemm"


@pytest.mark.parametrize("name,cat", CASES)
def test_kernel_names(name, cat):
    assert bd.categorize(name) == cat


def test_launching_op_decides_before_the_kernel_name():
    elementwise = "void at::native::elementwise_kernel<128, 2, ...>(int, ...)"
    assert bd.categorize(elementwise) == "other"
    # a copy inside the int4 GEMM op is GEMM time; a (generic) bmm inside the reference int4
    # attention is attention time, not GEMM
    assert bd.categorize(elementwise, ("breakdown::layer", "breakdown::qkv",
                                       "ostquant::int4_gemm", "aten::copy_")) == "gemm"
    assert bd.categorize("ampere_sgemm_128x64_tn",
                         ("breakdown::layer", "breakdown::attention",
                          "ostquant::int4_kv_attention", "aten::bmm")) == "attention"
    assert bd.categorize(elementwise, ("breakdown::kv_append",)) == "kv_append"
    assert bd.categorize(elementwise, ("aten::scaled_dot_product_attention",
                                       "aten::_scaled_dot_product_flash_attention")) == \
        "attention"
    # CPU op names (the dry run): the op itself is part of its stack
    assert bd.categorize("aten::mm", ("breakdown::qkv", "ostquant::int4_gemm")) == "gemm"
    assert bd.categorize("ostquant::quantize_per_token", ("breakdown::qkv",)) == "act_quant"
    assert bd.categorize("ostquant::hadamard_transform") == "hadamard"
    assert bd.categorize("ostquant::kv_cache_append_fused") == "kv_append"
    assert bd.categorize("aten::mm") == "gemm"  # a bare matmul op is GEMM time
    assert bd.projection_of(("breakdown::layer", "breakdown::down_proj",
                             "ostquant::int4_gemm")) == "down"
    assert bd.projection_of(("breakdown::layer", "breakdown::attention")) is None


def test_summarize_percentages_and_projections():
    gemm = GEMM_KERNELS[0]
    add = CASES[10][0]
    items = [
        bd.Item(gemm, ("breakdown::layer", "breakdown::qkv", "ostquant::int4_gemm"), 300.0),
        bd.Item(gemm, ("breakdown::layer", "breakdown::down_proj", "ostquant::int4_gemm"), 100.0),
        bd.Item(CASES[5][0], ("breakdown::layer", "breakdown::qkv",
                              "ostquant::quantize_per_token"), 50.0),
        bd.Item(CASES[2][0], ("breakdown::layer", "breakdown::attention",
                              "ostquant::int4_kv_attention"), 40.0),
        bd.Item(add, ("breakdown::layer", "aten::add"), 10.0),
    ]
    row = bd.summarize(items, iters=2)
    assert sum(row[f"{c}_pct"] for c in bd.CATEGORIES) == pytest.approx(100.0)
    assert row["profiled_ms"] == pytest.approx(0.25)  # 500 us over 2 calls
    assert row["gemm_ms"] == pytest.approx(0.2) and row["gemm_pct"] == pytest.approx(80.0)
    assert row["gemm_qkv_ms"] == pytest.approx(0.15)
    assert row["gemm_down_ms"] == pytest.approx(0.05)
    assert row["gemm_o_proj_ms"] == 0.0 and row["hadamard_ms"] == 0.0
    assert row["act_quant_pct"] == pytest.approx(10.0)
    assert row["attention_pct"] == pytest.approx(8.0)
    assert row["other_pct"] == pytest.approx(2.0)
    assert "vectorized_elementwise_kernel" in row["other_top"]
    with pytest.raises(ValueError, match="no profiled time"):
        bd.summarize([])


def test_labelled_scopes_are_removed_afterwards():
    lc = bd.LayerCase("tiny", "w4a4kv4", bd.Case("decode", 1, 1, 4), torch.float32, "cpu")
    mods = {a: getattr(lc.layer, a) for a in bd.PROJECTIONS}
    with bd.labelled(lc.layer, lc.cache):
        assert isinstance(lc.layer.qkv, bd._Scoped) and "attend" in lc.cache.__dict__
    assert all(getattr(lc.layer, a) is m for a, m in mods.items())
    assert "append" not in lc.cache.__dict__ and "attend" not in lc.cache.__dict__


def test_dry_run_through_the_cli(capsys, tmp_path, monkeypatch, single_thread):
    from ostquant import cli

    monkeypatch.setenv("OUT", str(tmp_path))
    seen = []
    real = bd.run

    def spy(*a, **kw):
        rows = real(*a, **kw)
        seen.extend(rows)
        return rows

    monkeypatch.setattr(bd, "run", spy)
    assert cli.main(["bench", "breakdown", "--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[dry-run] breakdown: ok" in out
    assert "cpu profiler" in out or "cuda profiler" in out
    assert list(tmp_path.iterdir()) == [], "dry run must not write results"
    assert [(r["phase"], r["batch"]) for r in seen] == [("prefill", 1), ("decode", 1),
                                                       ("decode", 2)]
    for r in seen:
        assert sum(r[f"{c}_pct"] for c in bd.CATEGORIES) == pytest.approx(100.0)
        assert r["layer_ms"] > 0 and r["profiled_ms"] > 0
        # W4A4KV4: every part of the layer shows up
        for c in ("gemm", "act_quant", "hadamard", "attention", "kv_append"):
            assert r[f"{c}_ms"] > 0, (c, r)
        # every GEMM of the layer runs inside one of the four projections
        split = sum(r[f"gemm_{s}_ms"] for _, s in bd.PROJECTIONS.values())
        assert split == pytest.approx(r["gemm_ms"]) and r["gemm_qkv_ms"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_says_so():
    with pytest.raises(SystemExit) as e:
        bd.main([])
    assert "needs a CUDA device" in str(e.value.code)
