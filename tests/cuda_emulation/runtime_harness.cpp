// Checks of emu_runtime.h itself, which every emulated kernel rests on: its block barrier,
// warp exchange, cooperative launch (blocks that wait for each other) and its report of a
// block whose threads cannot all reach a barrier. Usage: runtime_harness CHECK, CHECK one of
// barrier, warp, grid, deadlock; prints "ok" and exits 0 when the check holds.
#include "emu_runtime.h"

#include <string>

namespace {

// Each round, every thread adds its neighbour's value from the round before: right only if
// no thread runs ahead of a __syncthreads.
void block_rounds(int* out, int rounds) {
  int* v = reinterpret_cast<int*>(emu_smem());
  const unsigned n = blockDim.x, t = threadIdx.x;
  v[t] = int(t);
  __syncthreads();
  for (int r = 0; r < rounds; ++r) {
    const int mine = v[t] + v[(t + 1) % n];
    __syncthreads();
    v[t] = mine;
    __syncthreads();
  }
  out[blockIdx.x * n + t] = v[t];
}

// A butterfly sum over each warp's lanes.
void warp_sums(float* out) {
  float s = float(threadIdx.x);
  for (int m = 16; m > 0; m /= 2) s += __shfl_xor_sync(0xffffffffu, s, m);
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Each block writes its value, arrives at a counter, and thread 0 spins until every block
// has arrived; then each block reads all the others' values.
void grid_exchange(int* values, unsigned* arrived, int* sums) {
  const unsigned nb = gridDim.x;
  if (threadIdx.x == 0) {
    values[blockIdx.x] = int(blockIdx.x) + 1;
    __threadfence();
    atomicAdd(arrived, 1u);
    while (std::atomic_ref<unsigned>(*arrived).load() < nb) emu_yield();
  }
  __syncthreads();
  int s = 0;
  for (unsigned b = 0; b < nb; ++b) s += values[b];
  sums[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Thread 0 leaves; the others wait at a barrier that it never reaches.
void uneven_barrier() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

int fail(const char* what) {
  fprintf(stderr, "runtime_harness: %s\n", what);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string check = argv[1];
  const unsigned threads = 256;
  if (check == "barrier") {
    const unsigned blocks = 3;
    const int rounds = 5;
    std::vector<int> out(blocks * threads, -1);
    emu_run(dim3(blocks), dim3(threads), threads * sizeof(int), false,
            [&] { block_rounds(out.data(), rounds); });
    std::vector<long long> want(threads);
    for (unsigned t = 0; t < threads; ++t) want[t] = t;
    for (int r = 0; r < rounds; ++r) {
      std::vector<long long> next(threads);
      for (unsigned t = 0; t < threads; ++t) next[t] = want[t] + want[(t + 1) % threads];
      want = next;
    }
    for (unsigned i = 0; i < blocks * threads; ++i)
      if (out[i] != want[i % threads]) return fail("a __syncthreads let a thread run ahead");
  } else if (check == "warp") {
    std::vector<float> out(2 * threads, -1.f);
    emu_run(dim3(2), dim3(threads), 0, false, [&] { warp_sums(out.data()); });
    for (unsigned i = 0; i < 2 * threads; ++i) {
      const unsigned w = (i % threads) / 32;
      if (out[i] != float(32 * (32 * w) + 31 * 32 / 2)) return fail("a warp sum is wrong");
    }
  } else if (check == "grid") {
    const unsigned blocks = 9;
    std::vector<int> values(blocks, 0), sums(blocks * threads, -1);
    unsigned arrived = 0;
    emu_run(dim3(blocks), dim3(threads), 0, true,
            [&] { grid_exchange(values.data(), &arrived, sums.data()); });
    for (int s : sums)
      if (s != int(blocks * (blocks + 1) / 2)) return fail("a block read before all wrote");
  } else if (check == "deadlock") {
    emu_run(dim3(1), dim3(threads), 0, false, [&] { uneven_barrier(); });
    return fail("a barrier that thread 0 never reaches was passed");
  } else {
    return 2;
  }
  printf("ok\n");
  return 0;
}
