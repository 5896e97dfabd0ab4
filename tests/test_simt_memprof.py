"""The memory-access profiler of the SIMT emulator (tests/simt/memprof.{cpp,py}).

Access patterns with answers worked out by hand hold the model (sectors per request, bank
wavefronts) and the attribution to source lines; then the main paths of the kernels are held
to what their design promises: the quantizers' and the Hadamard's global traffic fully
coalesced, no bank conflicts in their reductions. A kernel change that breaks coalescing fails
here, on a CPU. Needs the CUDA headers, a C++ compiler and addr2line; builds its own
instrumented module (~2 min on two cores).
"""
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "simt"))

pytestmark = pytest.mark.simt


@pytest.fixture(scope="module")
def MP():
    if shutil.which("addr2line") is None:
        pytest.skip("addr2line (binutils) not found")
    import build
    why = build.unavailable()
    if why:
        pytest.skip(why)
    import memprof
    mod = memprof.load()
    assert mod.memprof_available
    return memprof, mod


def _pattern(MP, name, threads=32):
    memprof, mod = MP
    g = torch.zeros(32 * threads + 64)
    out = torch.zeros(threads)
    rep = memprof.profile(mod, lambda: mod.memprof_pattern(name, g, out, threads), g, out)
    sites = rep.find(kernel_contains=name)
    assert sites, f"{name}: no access recorded"
    return rep, sites


def _one(sites, space, op):
    got = [s for s in sites if s.space == space and s.op == op]
    assert len(got) == 1, f"expected one {space} {op} site, got {[s.to_dict() for s in got]}"
    return got[0]


# pattern -> (bytes per thread, sectors per request, ideal sectors per request) of its global load
GLOBAL = {
    "global_coalesced_4": (4, 4, 4),
    "global_strided_4": (4, 32, 4),
    "global_misaligned_4": (4, 5, 4),
    "global_vector_16": (16, 16, 16),
    "global_broadcast_4": (4, 1, 1),
}


@pytest.mark.parametrize("name", sorted(GLOBAL))
def test_global_sectors_per_request(MP, name):
    width, sectors, ideal = GLOBAL[name]
    _, sites = _pattern(MP, name)
    ld = _one(sites, "global", "load")
    assert (ld.width, ld.requests, ld.active_lanes) == (width, 1, 32)
    assert (ld.sectors, ld.ideal_sectors) == (sectors, ideal)
    assert ld.efficiency == pytest.approx(ld.unique_bytes / (32 * sectors))
    st = _one(sites, "global", "store")  # out[t] = ...: 32 x 4 B, coalesced
    assert (st.sectors, st.ideal_sectors, st.efficiency) == (4, 4, 1.0)
    # named by its source line (the patterns are in memprof.cpp)
    assert ld.where.startswith("simt/memprof.cpp:") and ("gp[" in ld.code or "gp)" in ld.code)


# pattern -> (width, wavefronts of the load, ideal) for one full warp
SHARED = {
    "shared_4": (4, 1, 1),
    "shared_4_stride2": (4, 2, 1),
    "shared_4_stride32": (4, 32, 1),
    "shared_4_broadcast": (4, 1, 1),
    "shared_8": (8, 2, 2),
    "shared_16": (16, 4, 4),
    "shared_16_stride2": (16, 8, 4),
}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_bank_wavefronts(MP, name):
    width, wf, ideal = SHARED[name]
    rep, sites = _pattern(MP, name)
    ld = _one(sites, "shared", "load")
    assert (ld.width, ld.requests) == (width, 1)
    assert (ld.wavefronts, ld.ideal_wavefronts, ld.max_wavefronts) == (wf, ideal, wf)
    assert ld.conflicts == wf - ideal
    assert rep.totals(ld.kernel)["shared_conflicts"] >= wf - ideal


def test_partial_warps_and_several_warps(MP):
    # 40 threads: one full warp and one of 8 lanes, each its own request
    _, sites = _pattern(MP, "global_coalesced_4", threads=40)
    ld = _one(sites, "global", "load")
    assert ld.requests == 2 and ld.lanes == 40
    assert (ld.sectors, ld.ideal_sectors) == (4 + 1, 4 + 1)


def test_a_failed_launch_leaves_nothing_behind(MP):
    memprof, mod = MP
    g, out = torch.zeros(32 * 32 + 64), torch.zeros(32)

    def run():
        with pytest.raises(RuntimeError, match="__trap"):
            mod.memprof_pattern("global_then_trap", g, out, 32)
        mod.memprof_pattern("global_coalesced_4", g, out, 32)
    rep = memprof.profile(mod, run, g, out)
    assert not rep.find(kernel_contains="global_then_trap")
    ld = _one(rep.find(kernel_contains="global_coalesced_4"), "global", "load")
    assert (ld.requests, ld.lanes, ld.sectors) == (1, 32, 4)


def test_unknown_pattern_and_unbuilt_module(MP):
    memprof, mod = MP
    with pytest.raises(RuntimeError, match="unknown pattern"):
        mod.memprof_pattern("nope", torch.zeros(2048), torch.zeros(32), 32)

    class Plain:
        memprof_available = False
    with pytest.raises(RuntimeError, match="OSTQUANT_SIMT_MEMPROF"):
        memprof.profile(Plain(), lambda: None)


def _case(MP, name):
    memprof, mod = MP
    fn, tensors = memprof._cases()[name](mod)
    return memprof.profile(mod, fn, *tensors)


@pytest.mark.parametrize("name", ["quantize_per_token", "quantize_per_token_packed",
                                  "rmsnorm_quantize_per_token", "hadamard_transform",
                                  "hadamard_transform_k172",
                                  "hadamard_quantize_per_token"])
def test_row_kernels_are_coalesced_and_conflict_free(MP, name):
    """The row kernels read and write whole rows with 16- / 8-byte vectors: every global request
    moves only sectors it uses, and their shared-memory scratch and reductions have no bank
    conflicts (the Hadamard's float4 scratch had 2-way conflicts, the fused Hadamard + quantize
    4-way ones, until memprof found them)."""
    rep = _case(MP, name)
    assert rep.sites, name
    for s in rep.sites:
        if s.space == "global":
            assert s.sectors == s.ideal_sectors, f"{name}: {s.to_dict()}"
        else:
            assert s.conflicts == 0, f"{name}: {s.to_dict()}"
    main = max((s for s in rep.sites if s.space == "global" and s.op == "load"),
               key=lambda s: s.bytes)
    assert main.width == 16 and main.active_lanes == 32, main.to_dict()


@pytest.mark.parametrize("name", ["attention_decode_mha_hd64", "attention_decode_paged_gqa_hd128"])
def test_attention_kv_loads_use_every_sector(MP, name):
    """In the runtime's cache layout (ops.int4_kv_tensors) the attention's per-step KV loads —
    the K / V codes and the per-token scale / zero — move only sectors they use. The scale/zero
    loads moved 8× their bytes while scale/zero were stored token-major ([.., slots, Hkv]):
    16 tokens of one head Hkv values apart."""
    rep = _case(MP, name)
    kv = [s for s in rep.sites if s.kernel.startswith("kv_attn_mma_kernel") and
          s.space == "global" and s.op == "load" and
          ("srow" in s.code or "reinterpret_cast<const uint" in s.code)]
    assert sum("srow" in s.code for s in kv) == 2, [s.to_dict() for s in rep.sites]
    assert len(kv) == 4, [s.to_dict() for s in kv]
    for s in kv:
        assert s.sectors == s.ideal_sectors, f"{name}: {s.to_dict()}"


def test_w4a16_decode_stages_x_coalesced_and_conflict_free(MP):
    """The W4A16 small-M GEMM at M = 16: weight and activation loads move only sectors they
    use, and the activations' trip through shared memory (coalesced store, fragment loads) has
    no bank conflicts. Loaded straight into the MMA fragments, the activations took 2× their
    sectors and, read by two warps per CTA, 8× the weights' sectors."""
    rep = _case(MP, "w4a16_gemm_decode_m16")
    main = [s for s in rep.sites if s.kernel.startswith("w4a16_small_m_kernel")]
    loads = [s for s in main if s.space == "global" and s.op == "load" and s.width == 16]
    smem = [s for s in main if s.space == "shared"]
    assert len(loads) == 2 and len(smem) == 4, [s.to_dict() for s in main]
    for s in loads:
        assert s.sectors == s.ideal_sectors, s.to_dict()
    for s in smem:
        assert s.conflicts == 0, s.to_dict()
    # weights 64 × 512 B = 1024 sectors; activations 16 × 2 KB once per CTA (2 CTAs) = 2048
    assert sorted(s.sectors for s in loads) == [1024, 2048], [s.to_dict() for s in loads]
