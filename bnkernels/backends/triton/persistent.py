"""The persistent training pass: reduce, merge and apply in one launch (launch.py's
Launch.persistent launches it; persistent_plan.py decides where it may).

    _persistent_kernel  grid (channel blocks, splits), the three-kernel path's own grid,
                        no larger than the programs the GPU holds at once. Each program:
      1. reduces its share of the rows (kernels._reduce_kernel's body: Welford forward,
         (sum g, sum g*xhat) backward) and publishes its partials in part[., split, c];
      2. waits at a grid barrier (_grid_barrier);
      3. merges every split of a slice of the channels, MERGE_C of them a program
         (kernels._merge_channels: a fixed order, bitwise the merge kernel's result), and
         writes their statistics (mean, rstd, var; or the backward's sums) and, once per
         channel, the running statistics;
      4. waits at a second barrier;
      5. reads its channels' statistics and runs kernels._apply_kernel's body over its
         share again: y = act(bn(x) (+ res)) forward, dx (and dres) backward.

Why two barriers, not one: after one barrier every program would merge all the splits
of its own channels, and for channels_last (every program holds all C channels) that is
P programs reading P * C partials each: 264 programs, C = 64, 70 MB of L2 reads for a
13 MB tensor. The second barrier costs a few microseconds; the merge then reads each
partial once.

Traffic: the share is read at step 1 and again at step 5, and nothing in between evicts
it where the tensor fits in L2 (persistent_plan's size rule), so DRAM sees x once forward
(2 tensor-sizes with y) and x and g once backward (3 with dx). The share is not kept in
registers: at ResNet-50's shapes a program's share is 6 to 50 tiles.

PHASE: 0 runs all five steps (a GPU, every program resident at once); 1, 2, 3 run steps
1, 3 and 5 alone, as three launches in that order, which is how the interpreter runs the
kernel (it runs programs one after another, so a program waiting at a barrier would
wait for programs that never start). The arithmetic is the same code either way; only
the barrier needs a GPU.

The barrier (_grid_barrier): state[0] counts arrivals, state[1] is the generation,
state[2] the error flag. A program reads the generation, arrives (atomic add, acq_rel),
and either is the last (resets the count, then bumps the generation, release) or spins
until the generation moves (acquire loads), at most SPIN_LIMIT times. A program that
gives up sets the error flag, and then (TRAP, a GPU) aborts the launch with a trap
instruction: the CUDA error surfaces as a RuntimeError at the stream's next
synchronisation, never a hang and never a silently wrong output. Running statistics are
written only while the flag is clear. The state is left as it was found (count 0) by
every launch that completes; persistent_plan keeps one per device.
"""
import triton
import triton.language as tl

from .kernels import _apply_kernel, _merge_channels, _reduce_kernel


@triton.jit
def _trap(flag):
    """Aborts the launch (PTX trap): a barrier that timed out."""
    tl.inline_asm_elementwise("mov.u32 $0, $1; trap;", "=r,r", [flag], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _grid_barrier(state_ptr, programs, SPIN_LIMIT: tl.constexpr, TRAP: tl.constexpr):
    """Waits until every one of the launch's programs has arrived (module docstring)."""
    tl.debug_barrier()  # every thread's stores of this program come before its arrival
    generation = tl.atomic_add(state_ptr + 1, 0, sem="acquire")
    arrived = tl.atomic_add(state_ptr, 1, sem="acq_rel")
    if arrived == programs - 1:
        tl.atomic_xchg(state_ptr, 0, sem="relaxed")
        tl.atomic_add(state_ptr + 1, 1, sem="release")
    else:
        seen = generation
        spins = 0
        while (seen == generation) & (spins < SPIN_LIMIT):
            seen = tl.atomic_add(state_ptr + 1, 0, sem="acquire")
            spins += 1
        if seen == generation:
            tl.atomic_xchg(state_ptr + 2, 1)
            if TRAP:
                _trap(seen)
    tl.debug_barrier()  # no thread reads the others' results before the wait is over


@triton.jit
def _persistent_kernel(
    x_ptr, g_ptr, res_ptr, y_ptr, out_ptr, dres_ptr, mean_ptr, rstd_or_var_ptr, weight_ptr,
    bias_ptr, part_ptr, out0_ptr, out1_ptr, out2_ptr, dbias_ptr, dweight_ptr, rm_ptr,
    rv_ptr, nbt_ptr, state_ptr,
    C, S, R, rows_per_split, eps, momentum_hi, momentum_lo, count,
    sxN, sxC, sxS, sgN, sgC, sgS, srN, srC, srS, syN, syC, syS, soN, soC, soS, sdN, sdC, sdS,
    smC, ssC, swC, sbC, srmC, srvC,
    PHASE: tl.constexpr, SPIN_LIMIT: tl.constexpr, TRAP: tl.constexpr,
    MERGE_C: tl.constexpr, MERGE_S: tl.constexpr,
    BACKWARD: tl.constexpr, FROM_VAR: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr,
    HAS_DBIAS: tl.constexpr, HAS_DWEIGHT: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK_FROM_Y: tl.constexpr,
    HAS_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FLAT_ROWS: tl.constexpr, INDEX_64: tl.constexpr, CHANNEL_SPAN: tl.constexpr,
    S_CONST: tl.constexpr, STAGES: tl.constexpr, REDUCE_STAGES: tl.constexpr,
    ROW_STEP: tl.constexpr, REDUCE_BLOCK_R: tl.constexpr, REDUCE_ROW_STEP: tl.constexpr,
    SEG_C: tl.constexpr, SEG_S: tl.constexpr,
    VEC: tl.constexpr, PARTS: tl.constexpr, SEG_P: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """A training pass in one launch (module docstring), forward or (BACKWARD) backward
    through the batch statistics:
        forward:  mean, var of x over its N*S values (the reduce and merge kernels'
                  arithmetic), y = act((x - mean) * gamma * rstd + beta (+ residual))
        backward: a = sum g, b = sum g * xhat, then
                  dx = gamma * rstd * (g - a / m - xhat * b / m),  m = count
    Forward, mean_ptr and rstd_or_var_ptr are unused: the apply reads out0 and out1, the
    statistics the merge step wrote. Backward, they are the saved statistics, and the
    apply reads the sums from out0 and out1."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    values = R  # a channel's values, and a split's: rows, or (channel blocks) samples of S
    split_values = rows_per_split
    if CHANNEL_SPAN > 0:
        values = R * S
        split_values = rows_per_split * S
    if PHASE == 0 or PHASE == 1:
        _reduce_kernel(
            x_ptr, g_ptr, res_ptr, y_ptr, mean_ptr, rstd_or_var_ptr, weight_ptr, bias_ptr,
            part_ptr, out0_ptr, out1_ptr, out2_ptr, dbias_ptr, dweight_ptr, rm_ptr, rv_ptr,
            nbt_ptr, C, S, R, rows_per_split, eps, momentum_hi, momentum_lo,
            sxN, sxC, sxS, sgN, sgC, sgS, srN, srC, srS, syN, syC, syS, smC, ssC, swC, sbC,
            srmC, srvC, BACKWARD, FROM_VAR, False, UPDATE_RUNNING, CUMULATIVE, HAS_DBIAS,
            HAS_DWEIGHT, ACTIVATION, HAS_RESIDUAL, MASK_FROM_Y, HAS_WEIGHT, HAS_BIAS,
            FLAT_ROWS, INDEX_64, CHANNEL_SPAN, S_CONST, REDUCE_STAGES, REDUCE_ROW_STEP,
            SEG_C, SEG_S, VEC, PARTS, SEG_P, BLOCK_C, REDUCE_BLOCK_R, ACC)
    if PHASE == 0:
        _grid_barrier(state_ptr, programs, SPIN_LIMIT, TRAP)
    if PHASE == 0 or PHASE == 2:
        flag = tl.load(state_ptr + 2, volatile=True)  # a barrier gave up: write nothing
        q = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        c = q * MERGE_C + tl.arange(0, MERGE_C)
        _merge_channels(part_ptr, c, (c < C) & ((c * 0 + flag) == 0), out0_ptr, out1_ptr,
                        out2_ptr, dbias_ptr, dweight_ptr, rm_ptr, rv_ptr, nbt_ptr, C, values,
                        split_values, tl.num_programs(1), eps, momentum_hi, momentum_lo,
                        srmC, srvC, BACKWARD, UPDATE_RUNNING, CUMULATIVE, HAS_DBIAS,
                        HAS_DWEIGHT, MERGE_S, ACC)
    if PHASE == 0:
        _grid_barrier(state_ptr, programs, SPIN_LIMIT, TRAP)
    if PHASE == 0 or PHASE == 3:
        if COUNT_BATCH:  # after every read of the counter (the merge step's), if clear
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                if tl.load(state_ptr + 2, volatile=True) == 0:
                    tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
        if BACKWARD:
            stats_mean, stats_spread, stats_from_var, stats_smC, stats_ssC = (
                mean_ptr, rstd_or_var_ptr, FROM_VAR, smC, ssC)
        else:
            stats_mean, stats_spread, stats_from_var, stats_smC, stats_ssC = (
                out0_ptr, out1_ptr, False, 1, 1)
        _apply_kernel(
            x_ptr, g_ptr, res_ptr, y_ptr, out_ptr, dres_ptr, stats_mean, stats_spread,
            weight_ptr, bias_ptr, out0_ptr, out1_ptr, x_ptr, nbt_ptr,
            C, S, R, rows_per_split, eps, count,
            sxN, sxC, sxS, sgN, sgC, sgS, srN, srC, srS, syN, syC, syS, soN, soC, soS,
            sdN, sdC, sdS, stats_smC, stats_ssC, swC, sbC,
            BACKWARD, BACKWARD, stats_from_var, False, False,
            ACTIVATION, HAS_RESIDUAL, MASK_FROM_Y, HAS_DRES, HAS_WEIGHT, HAS_BIAS,
            FLAT_ROWS, INDEX_64, CHANNEL_SPAN, S_CONST, STAGES, ROW_STEP, SEG_C, SEG_S,
            BLOCK_C, BLOCK_R, ACC)
