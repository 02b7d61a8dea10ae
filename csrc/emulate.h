// A CPU stand-in for the CUDA launch, so that the kernels' own code runs in the CPU-only
// test suite (built with g++ -DBNK_EMULATE; see portable.cuh).
//
// Each thread of a block is a fiber (ucontext) on one OS thread; __syncthreads() switches
// back to the scheduler, which resumes every thread of the block in turn. Blocks run one
// after another, so a kernel's `static` "shared" arrays are shared by exactly one block's
// threads. A barrier reached by some threads of a block while others have returned is an
// error here (undefined behaviour on a GPU), reported as BNK_EMU_DIVERGENT_BARRIER.
#pragma once
#include <ucontext.h>
#include <vector_functions.h>  // dim3, uint3, make_uint3: the CUDA headers' own, host-compilable

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

namespace bnk_emu {

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

enum { READY = 0, AT_BARRIER = 1, DONE = 2 };
enum { BNK_EMU_DIVERGENT_BARRIER = 10001, BNK_EMU_BAD_LAUNCH = 10002 };
constexpr size_t STACK_BYTES = 64 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  int state = DONE;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline unsigned current = 0;
inline const std::function<void()>* body = nullptr;
inline std::mutex one_launch_at_a_time;

inline void run_current() {
  (*body)();
  fibers[current].state = DONE;  // then uc_link returns to the scheduler
}

inline void syncthreads() {
  fibers[current].state = AT_BARRIER;
  swapcontext(&fibers[current].context, &scheduler);
}

// Runs one block's threads to their ends, round by round; 0 or an error code.
inline int run_block(unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) f.stack.reset(new char[STACK_BYTES]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = STACK_BYTES;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, run_current, 0);
    f.state = READY;
  }
  for (;;) {  // one round: every live thread runs to its next barrier or its end
    for (unsigned t = 0; t < threads; ++t) {
      if (fibers[t].state == DONE) continue;
      fibers[t].state = READY;
      current = t;
      threadIdx = make_uint3(t, 0, 0);
      swapcontext(&scheduler, &fibers[t].context);
    }
    unsigned done = 0;
    for (unsigned t = 0; t < threads; ++t) done += fibers[t].state == DONE;
    if (done == threads) return 0;
    if (done > 0) return BNK_EMU_DIVERGENT_BARRIER;
  }
}

// Runs body as every thread of every block of the grid, one launch at a time (the state
// above is per process); 0 or an error code.
inline int launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || block.y != 1 || block.z != 1 || grid.z != 1) return BNK_EMU_BAD_LAUNCH;
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  if (fibers.size() < threads) fibers.resize(threads);
  body = &kernel;
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = make_uint3(bx, by, 0);
      const int err = run_block(threads);
      if (err) return err;
    }
  }
  return 0;
}

}  // namespace bnk_emu
