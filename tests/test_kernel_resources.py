"""bench/resources.py: the static resources of the compiled kernels (registers, spills, stack,
launch bounds) read from the built extension with cuobjdump, and the budgets CI holds them to.
Parsing is tested on cuobjdump's text here; the real check runs wherever ostquant._C was built
with CUDA (CI builds it for sm_90a), no GPU needed."""
from __future__ import annotations

import pytest

from bench import resources as R

USAGE = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /x/y/csrc/attention/kv_attention.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8ostquant18kv_attn_mma_kernelI6__halfLi128EEEvNS_10AttnParamsE:
  REG:168 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:696 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN8ostquant22kv_attn_combine_kernelEv:
  REG:32 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /x/y/csrc/quant/pack.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8ostquant16pack_int4_kernelEv:
  REG:26 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:380 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

ELF = """
Fatbin elf code:
================
arch = sm_90a
identifier = /x/y/csrc/attention/kv_attention.cu

.nv.info._ZN8ostquant18kv_attn_mma_kernelI6__halfLi128EEEvNS_10AttnParamsE
\t<0x4>
\tAttribute:\tEIATTR_MAXREG_COUNT
\tFormat:\tEIFMT_HVAL
\tValue:\t0xa8
\t<0x6>
\tAttribute:\tEIATTR_ANNOTATIONS
\tFormat:\tEIFMT_SVAL
\tValue:\tSpillRefill : \tOffset : 0x710
\t\tSpillRefill : \tOffset : 0x2420
\t\tSpillRefill : \tOffset : 0x6970
\t<0x11>
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x80 0x2 0x1 
.nv.info._ZN8ostquant22kv_attn_combine_kernelEv
\t<0x4>
\tAttribute:\tEIATTR_MAXREG_COUNT
\tFormat:\tEIFMT_HVAL
\tValue:\t0xff
.text._ZN8ostquant22kv_attn_combine_kernelEv
\tSpillRefill : this text section is not an attribute of the kernel above

Fatbin elf code:
================
arch = sm_80
identifier = /x/y/csrc/quant/pack.cu

.nv.info._ZN8ostquant16pack_int4_kernelEv
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x100 0x1 0x1 
"""


def test_parse_resource_usage():
    ks = R.parse_resource_usage(USAGE)
    assert [(k.arch, k.source, k.regs, k.stack, k.shared) for k in ks] == [
        ("sm_90a", "attention/kv_attention.cu", 168, 16, 1024),
        ("sm_90a", "attention/kv_attention.cu", 32, 0, 1024),
        ("sm_80", "quant/pack.cu", 26, 0, 0),
    ]
    assert ks[0].name == "_ZN8ostquant18kv_attn_mma_kernelI6__halfLi128EEEvNS_10AttnParamsE"


def test_parse_elf_info():
    info = R.parse_elf_info(ELF)
    mma = info[("sm_90a", "_ZN8ostquant18kv_attn_mma_kernelI6__halfLi128EEEvNS_10AttnParamsE")]
    assert mma == {"max_threads": 128 * 2, "reg_cap": 168, "spills": 3}
    # a later non-info section (.text...) does not count for the kernel before it
    comb = info[("sm_90a", "_ZN8ostquant22kv_attn_combine_kernelEv")]
    assert comb == {"max_threads": None, "reg_cap": 255, "spills": 0}
    # the same name under another arch is another entry
    assert info[("sm_80", "_ZN8ostquant16pack_int4_kernelEv")]["max_threads"] == 256


def test_names():
    assert R.short_name("void ostquant::(anonymous namespace)::kv_attn_mma_kernel<__half, 128>"
                        "(ostquant::(anonymous namespace)::AttnParams)") == \
        "kv_attn_mma_kernel<__half, 128>"
    assert R.short_name("void ostquant::row_quant_kernel<(ostquant::RowQuantMode)1, float, 2, 4>"
                        "(float const*, ostquant::RowQuantArgs)") == \
        "row_quant_kernel<(RowQuantMode)1, float, 2, 4>"
    assert R.short_name("void cutlass::Kernel2<cutlass::gemm::kernel::X<int, 4> >"
                        "(cutlass::gemm::kernel::X<int, 4>::Params)") == "cutlass::Kernel2<...>"
    # what c++filt left mangled (several-KB CUTLASS names)
    assert R.short_name("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tuple"
                        "IJiiiiEEEEEEvNT_6ParamsE") == "cutlass::device_kernel<...>"
    assert R.short_name("_ZN8ostquant19int4_row_sum_kernelEPKhllPf") == \
        "ostquant::int4_row_sum_kernel"


def _k(short, spills=0, stack=0, regs=32, max_threads=None, source="quant/pack.cu"):
    return R.Kernel(name="_Zx", arch="sm_90a", source=source, regs=regs, stack=stack, shared=0,
                    local=0, max_threads=max_threads, spills=spills, short=short)


def test_check_budgets():
    budgets = (R.Budget(r"spiller<", 4, 16, "known"), R.Budget(r"^quant/", 0, 0, "the rest"))
    ok = [_k("spiller<float>", spills=4, stack=16), _k("pack_int4_kernel<true>")]
    assert R.check(ok, budgets) == []
    bad = R.check([_k("spiller<half>", spills=5, stack=8)], budgets)
    assert len(bad) == 1 and "5 spill instructions" in bad[0] and "known" in bad[0]
    bad = R.check([_k("pack_int4_kernel<true>", stack=8)], budgets)
    assert len(bad) == 1 and "8 stack bytes" in bad[0]
    # a kernel no budget names is a problem, not a pass
    bad = R.check([_k("new_kernel", source="gemm/new.cu")], budgets)
    assert bad and "no budget" in bad[0]
    assert "256 registers" in R.check([_k("pack_int4_kernel", regs=256)], budgets)[0]
    assert "> 64K" in R.check([_k("pack_int4_kernel", regs=72, max_threads=1024)], budgets)[0]
    # the project's budgets: the catch-all comes last and allows nothing
    assert R.BUDGETS[-1].pattern == "" and (R.BUDGETS[-1].spills, R.BUDGETS[-1].stack) == (0, 0)
    assert R.budget_for(_k("kv_attn_mma_kernel<__half, 128>")).spills > 0
    assert R.budget_for(_k("kv_attn_mma_kernel<__half, 64>")).spills == 0
    assert R.budget_for(_k("row_quant_kernel<(RowQuantMode)0, __half, 8, 4>")).spills == 0


SASS = """
Fatbin elf code:
================
arch = sm_90a
identifier = /x/y/csrc/gemm/w4a4_small_m.cu

	code for sm_90a
		Function : _ZN8ostquant19w4a4_small_m_kernelEv
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR6][R2.64] ;   /* 0x0000000602047981 */
        /*0020*/                   IMMA.16832.S8.S8 R160, R160.ROW, R222.COL, RZ ;   /* 0x000000dea0a07237 */
        ..........
		Function : _ZN8ostquant18split_reduce_kernelEv
        /*0000*/                   EXIT ;                                  /* 0x000000000000794d */
"""


def test_parse_and_check_sass():
    sass = R.parse_sass(SASS)
    mm = sass[("sm_90a", "_ZN8ostquant19w4a4_small_m_kernelEv")]
    assert mm == ["LDC R1, c[0x0][0x28]", "LDG.E.128.CONSTANT R4, desc[UR6][R2.64]",
                  "IMMA.16832.S8.S8 R160, R160.ROW, R222.COL, RZ"]
    assert sass[("sm_90a", "_ZN8ostquant18split_reduce_kernelEv")] == ["EXIT"]
    ks = [R.Kernel("_ZN8ostquant19w4a4_small_m_kernelEv", "sm_90a", "gemm/w4a4_small_m.cu", 64, 0,
                   0, 0, short="w4a4_small_m_kernel"),
          R.Kernel("_ZN8ostquant18split_reduce_kernelEv", "sm_90a", "gemm/w4a4_small_m.cu", 8, 0,
                   0, 0, short="split_reduce_kernel")]
    ok = (R.Expect(r"small_m_kernel", (r"IMMA\.16832\.S8\.S8", r"LDG\.E\.128"), "mma"),)
    assert R.check_sass(ks, sass, ok) == []
    # an instruction the kernel lacks, a kernel family that is not there
    bad = R.check_sass(ks, sass, (R.Expect(r"split_reduce", (r"HMMA",), "x"),
                                  R.Expect(r"attention", (r"HMMA",), "y")))
    assert len(bad) == 2 and "no instruction matches 'HMMA'" in bad[0] and "no kernel" in bad[1]
    # expectations for an arch the build does not hold are skipped; arch is a regex
    assert R.check_sass(ks, sass, (R.Expect(r"attention", (r"X",), "z", arch=r"sm_8\d"),)) == []
    assert len(R.check_sass(ks, sass, (R.Expect(r"attention", (r"X",), "z", arch=r"sm_9\d+a?"),))) == 1
    # the project's expectations cover the four GEMM families and the attention
    covered = " ".join(e.kernel for e in R.EXPECTED_SASS)
    for fam in ("sm90/w4a4", "sm90/w4a16", "w4a4_small_m", "w4a16_small_m", "kv_attn_mma"):
        assert fam in covered


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(R.ResourceError, match="no such file"):
        R.collect(str(tmp_path / "nope.so"), cuobjdump_tool="/bin/true")
    f = tmp_path / "empty.so"
    f.write_bytes(b"")
    with pytest.raises(R.ResourceError, match="no device code"):
        R.collect(str(f), cuobjdump_tool="/bin/true")


_SO = R.extension_path()
_TOOL = R.find_tool("cuobjdump")


@pytest.mark.skipif(_SO is None, reason="ostquant._C was not built (pure-Python install)")
@pytest.mark.skipif(_TOOL is None, reason="no cuobjdump (CUDA toolkit or Triton's tools)")
def test_built_kernels_within_budget():
    """Every kernel of the built extension within BUDGETS (no spills except the documented
    ones) and holding the instructions of EXPECTED_SASS: a change that makes a kernel spill or
    take another path fails here, on CPU CI, before any GPU run."""
    try:
        kernels = R.collect(_SO, _TOOL)
    except R.ResourceError as e:
        if "no device code" in str(e):
            pytest.skip(str(e))
        raise
    problems = R.check(kernels)
    assert not problems, "\n".join(problems)
    # the instructions the design rests on are in the code (no silent fallback path)
    import ostquant._C as C

    # (the CUTLASS GEMMs' expectations only where the build has them)
    expected = [e for e in R.EXPECTED_SASS
                if not ("sm90/" in e.kernel and not C.sm90_gemm)
                and not ("sm80/" in e.kernel and not C.sm80_gemm)]
    problems = R.check_sass(kernels, R.load_sass(_SO, kernels, _TOOL), expected)
    assert not problems, "\n".join(problems)

    by_source = {}
    for k in kernels:
        by_source.setdefault(k.source, []).append(k)
    # the hand-written kernels of every op family are in the build
    for src in ("attention/kv_attention.cu", "attention/kv_append.cu", "hadamard/hadamard.cu",
                "quant/quantize_per_token.cu", "gemm/w4a4_small_m.cu"):
        assert src in by_source, f"no kernels from {src}"
    sm90 = [k for k in kernels if k.source.startswith("gemm/sm90/")]
    if C.sm90_gemm:
        # the eight Hopper GEMMs: one producer + two consumer warp groups (384 threads) at the
        # launch register count CUTLASS's setmaxnreg redistribution starts from, no spills
        assert len(sm90) == 8, [k.source for k in sm90]
        for k in sm90:
            assert k.max_threads == 384 and k.regs * 384 <= 65536 and k.spills == 0, k.row()
    else:
        assert not sm90
