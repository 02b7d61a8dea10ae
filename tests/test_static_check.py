"""bench/static_check.py: the kernels as a GPU launch compiles them (Triton's binder and
specialisation, sm_90), read from their SASS, on a machine without a GPU."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import static_check  # noqa: E402

needs_binder = pytest.mark.skipif(not static_check.binder_available(),
                                  reason="static_check drives triton 3.9's binder")


def _compiling_env() -> dict:
    """This environment without TRITON_INTERPRET: the kernels must be real JIT functions."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


COLUMNS = ("kernel,pass,dtype,layout,N,C,H,W,access_bits,idiv_per_elem,rcp_per_elem,regs,"
           "spills,instr_per_elem,mbytes,est_ratio,inflight_kb").split(",")

# A made-up kernel: set-up, then a loop (the backward branch at 0x0060 to 0x0020) with a
# 128-bit load, a 16-bit store, an integer division's I2F.U32.RP + MUFU.RCP and one other
# MUFU.RCP; the 32-bit load and the MUFU.RCP after the loop are outside it; a second loop
# (0x00b0 to 0x0080), pipelined: a 64-bit load, a 128-bit cp.async copy (LDGSTS) and its
# LDGDEPBAR (no access); after EXIT, the branch to itself that is no loop.
_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0030*/                   I2F.U32.RP R3, R9 ;
        /*0040*/                   MUFU.RCP R3, R3 ;
        /*0050*/              @P0  MUFU.RCP R5, R5 ;
        /*0058*/                   STG.E.U16 desc[UR4][R6.64], R5 ;
        /*0060*/              @P1  BRA 0x20 ;
        /*0070*/                   MUFU.RCP R7, R7 ;
        /*0080*/                   LDG.E.64 R10, desc[UR4][R6.64] ;
        /*0090*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*00a0*/                   LDGDEPBAR ;
        /*00b0*/              @P2  BRA 0x80 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0 ;
"""


def test_the_loops_are_read_from_the_sass():
    read = static_check.read_loops(_SASS)
    first = {"loop_instructions": 6, "access_bits": 16, "idiv": 1, "rcp": 1,
             "load_bytes": 16, "async_loads": 0}
    second = {"loop_instructions": 4, "access_bits": 64, "idiv": 0, "rcp": 0,
              "load_bytes": 24, "async_loads": 1}
    # outside the loops: the MOV, the 32-bit load, the MUFU.RCP and EXIT (not the idle
    # branch after it)
    assert read == {"loop_instructions": 10, "access_bits": 16, "idiv": 1, "rcp": 1,
                    "load_bytes": 40, "async_loads": 1, "outside": 4,
                    "loops": [first, second]}


def test_programs_resident_per_sm():
    """The occupancy limits of an H100's SM, as the inflight_kb column counts them."""
    assert static_check.resident_programs(32, 256, 0, 10_000) == 8  # threads
    assert static_check.resident_programs(128, 256, 0, 10_000) == 2  # registers
    assert static_check.resident_programs(255, 256, 0, 10_000) == 1
    assert static_check.resident_programs(32, 256, 64 * 1024, 10_000) == 3  # shared memory
    assert static_check.resident_programs(32, 256, 0, 264) == 2  # the grid's own share


# A made-up grid barrier in PTX, as Triton lowers it: thread 0 (%p1) arrives and releases
# after a CTA barrier, and every thread reads the others' results after a CTA barrier that
# follows thread 0's acquire; between them, only thread 0's own accesses.
_BARRIER_PTX = """
	st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };
	bar.sync 	0;
	@%p1 ld.global.gpu.acquire.b32 %r5, [ %rd2 + 0 ];
	bar.sync 	0;
	@%p1 atom.global.gpu.acq_rel.add.u32 %r6, [ %rd3 + 0 ], %r7;
	bar.sync 	0;
	@%p1 atom.global.gpu.relaxed.exch.b32 %r8, [ %rd3 + 0 ], %r9;
	@%p1 red.global.gpu.release.add.u32 [ %rd2 + 0 ], %r7;
	bar.sync 	0;
	ld.global.b32 %r10, [ %rd4 + 0 ];
"""


def test_the_barrier_ordering_is_read_from_the_ptx():
    import static_check_persistent
    read = static_check_persistent.read_barrier
    sass = "CCTL.IVALL ;\n LDG.E R2, desc[UR4][R4.64] ;\n CCTL.IVALL ;"
    assert read(_BARRIER_PTX, sass) == {"acquires": 2, "releases": 2, "unfenced": 0,
                                        "nc_loads": 0, "l1_invalidates": 2}
    # every thread's store between the CTA barrier and the release: not ordered before it
    racy = _BARRIER_PTX.replace("\tbar.sync \t0;\n\t@%p1 atom.global.gpu.acq_rel",
                                "\tbar.sync \t0;\n\tst.global.b32 [ %rd5 + 0 ], %r1;\n"
                                "\t@%p1 atom.global.gpu.acq_rel")
    assert read(racy, "")["unfenced"] == 1
    # every thread's load right after the acquire, with no CTA barrier between: too early
    early = _BARRIER_PTX.replace("red.global.gpu.release.add.u32 [ %rd2 + 0 ], %r7;\n"
                                 "\tbar.sync \t0;", "red.global.gpu.release.add.u32 "
                                 "[ %rd2 + 0 ], %r7;")
    early = early.replace("\t@%p1 ld.global.gpu.acquire.b32 %r5, [ %rd2 + 0 ];\n\tbar.sync",
                          "\t@%p1 ld.global.gpu.acquire.b32 %r5, [ %rd2 + 0 ];\n"
                          "\tld.global.b32 %r11, [ %rd4 + 0 ];\n\tbar.sync")
    assert read(early, "")["unfenced"] == 1
    # loads through the non-coherent path, in either text
    assert read(_BARRIER_PTX + "\tld.global.nc.v4.b32 {%r1}, [ %rd4 + 0 ];\n",
                "LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;")["nc_loads"] == 2


@needs_binder
def test_static_check_quick_writes_the_table(tmp_path):
    env = _compiling_env()
    done = subprocess.run([sys.executable, str(BENCH / "static_check.py"), "--quick", "--arch",
                           "90", "--jobs", "2", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "FP_FUSION" not in done.stderr, done.stderr[-4000:]  # (as the persistent check)
    with open(tmp_path / "sm90.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    passes = {r["pass"] for r in rows}
    assert passes == set(static_check.PASSES)
    assert {r["layout"] for r in rows} == {"nchw", "nhwc"}
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_reduce_kernel", "_merge_kernel", "_apply_kernel", "all"}
    for r in rows:
        assert int(r["access_bits"]) in (8, 16, 32, 64, 128)
        assert int(r["access_bits"]) == 128  # NCHW 7x7 too: channel blocks (plan.py)
        assert float(r["est_ratio"]) >= 1.0 and float(r["mbytes"]) > 0
        assert int(r["regs"]) > 0 and int(r["spills"]) == 0
        assert float(r["idiv_per_elem"]) == 0  # NCHW row tiles too: S a constexpr
        if r["kernel"] in ("_reduce_kernel", "_apply_kernel"):  # (and their pass's "all")
            assert float(r["inflight_kb"]) >= static_check.INFLIGHT_KB, r
    # every pass has its total row, and an eval forward is one apply launch
    eval_rows = [r for r in rows if r["pass"] == "fwd_eval"]
    assert {r["kernel"] for r in eval_rows} == {"_apply_kernel", "all"}
    assert (tmp_path / "summary_sm90.md").read_text().startswith("# Static check, sm_90")


def test_static_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(BENCH / "static_check.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "without TRITON_INTERPRET" in done.stdout


@pytest.mark.skipif(__import__("shutil").which("c++filt") is None or
                    __import__("bnkernels.backends.cuda.build", fromlist=["x"]).find_nvcc()
                    is None, reason="needs nvcc and c++filt")
def test_static_check_of_csrc_quick(tmp_path):
    """bench/static_check_csrc.py --quick: csrc/'s kernels as nvcc compiles them, read with
    the same reader and model: the large shapes take 128-bit vectors in every hot loop,
    with no division and no spill, estimated within 1.5x the floor (issue 18's bar)."""
    env = _compiling_env()
    done = subprocess.run([sys.executable, str(BENCH / "static_check_csrc.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(tmp_path / "csrc_sm90.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["pass"] for r in rows} == set(static_check.PASSES)
    for r in rows:
        assert int(r["spills"]) == 0
        large = int(r["N"]) * int(r["C"]) * int(r["H"]) * int(r["W"]) * 2 >= 16e6
        if large and r["kernel"] != "merge":
            assert int(r["vec"]) == 8 and int(r["access_bits"]) == 128, r
            assert float(r["idiv_per_elem"]) == 0, r
        if large and r["kernel"] == "all":
            assert float(r["est_ratio"]) <= 1.5, r
    assert (tmp_path / "summary_csrc_sm90.md").read_text().startswith("# Static check of csrc/")


@needs_binder
def test_static_check_of_the_persistent_pass_quick(tmp_path):
    """bench/static_check_persistent.py --quick: the persistent kernel as a GPU launch
    compiles it (its barrier's trap included): no spill, its reduce and apply loops 128
    bits wide, and every grid within the programs an H100 holds at once, so that its
    barrier never waits for a program that cannot start."""
    env = _compiling_env()
    done = subprocess.run([sys.executable, str(BENCH / "static_check_persistent.py"),
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    # every launch names FMA contraction (launch.COMPILE_OPTIONS): triton 3.9 warns where
    # its default decides, a default that 3.10 turns the other way
    assert "FP_FUSION" not in done.stderr, done.stderr[-4000:]
    with open(tmp_path / "persistent_sm90.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["pass"] for r in rows} == {"fwd_train", "bwd", "bnaddrelu_fwd_train",
                                         "bnaddrelu_bwd"}
    assert any(r["auto"] == "1" for r in rows) and any(r["auto"] == "0" for r in rows)
    for r in rows:
        assert int(r["spills"]) == 0, r
        assert int(r["programs"]) <= int(r["resident"]), r
        assert int(r["loops_128"]) >= 2, r  # the reduce's and the apply's
        # the two grid barriers: each loads the generation (acquire) twice, arrives
        # (acq_rel) and bumps the generation (release); all fenced by CTA barriers, and
        # nothing another program wrote read through the non-coherent path
        assert int(r["acquires"]) >= 6 and int(r["releases"]) >= 4, r
        assert int(r["unfenced"]) == 0 and int(r["nc_loads"]) == 0, r


@needs_binder
def test_variants_recorded_here_compile_with_another_triton(tmp_path):
    """bench/compile_other_triton.py: the variants specialised by this triton's binder,
    written as JSON and compiled back from it (on the GPU machine's triton 3.6 by hand;
    here by this one), read as static_check reads them."""
    env = _compiling_env()
    script = str(BENCH / "compile_other_triton.py")
    variants = tmp_path / "variants.json"
    subprocess.run([sys.executable, script, "record", str(variants), "--quick"], env=env,
                   check=True, capture_output=True, timeout=600)
    import json
    recorded = json.loads(variants.read_text())
    assert {v["name"] for v in recorded} == {"_reduce_kernel", "_merge_kernel",
                                             "_apply_kernel", "_persistent_kernel"}
    # three variants of the three kernels and one of the persistent kernel's (its barrier)
    persistent = [v for v in recorded if v["name"] == "_persistent_kernel"]
    variants.write_text(json.dumps(recorded[:3] + persistent[:1]))
    done = subprocess.run([sys.executable, script, "compile", str(variants),
                           "--jobs", "2", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = next(tmp_path.glob("summary_triton*_sm90.md")).read_text()
    assert "# 4 kernel variants compiled for sm_90" in summary
    assert "- failed to compile: 0" in summary and "- spilling: 0" in summary
    assert ("not fenced by CTA barriers: 0; loads through the non-coherent path: 0"
            in summary)
