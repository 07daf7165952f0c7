// File I/O shared by the RNN harnesses: inputs arrive as float32 arrays in one file, outputs
// leave as float32 arrays (converted from the kernel's storage dtype) in another.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "rnn.h"

// One buffer of the kernels' storage dtype, NaN-filled until written.
struct Store {
  seqkern::cuda::rnn::DType dt;
  std::vector<unsigned char> bytes;
  Store(seqkern::cuda::rnn::DType d, size_t n)
      : dt(d), bytes(n * (d == seqkern::cuda::rnn::DType::kFloat ? 4 : 2), 0xff) {}
  void* data() { return bytes.data(); }
  void set(size_t i, float v) {
    using seqkern::cuda::rnn::DType;
    if (dt == DType::kFloat) reinterpret_cast<float*>(bytes.data())[i] = v;
    else if (dt == DType::kHalf) reinterpret_cast<__half*>(bytes.data())[i] = __float2half_rn(v);
    else reinterpret_cast<__nv_bfloat16*>(bytes.data())[i] = __float2bfloat16_rn(v);
  }
  float get(size_t i) const {
    using seqkern::cuda::rnn::DType;
    if (dt == DType::kFloat) return reinterpret_cast<const float*>(bytes.data())[i];
    if (dt == DType::kHalf) return __half2float(reinterpret_cast<const __half*>(bytes.data())[i]);
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(bytes.data())[i]);
  }
};

struct Reader {
  FILE* f;
  template <class T>
  void ints(T* v, size_t n) {
    std::vector<int32_t> t(n);
    if (n && fread(t.data(), 4, n, f) != n) fail();
    for (size_t i = 0; i < n; ++i) v[i] = t[i];
  }
  std::vector<float> floats(size_t n) {
    std::vector<float> v(n);
    if (n && fread(v.data(), 4, n, f) != n) fail();
    return v;
  }
  [[noreturn]] static void fail() {
    fprintf(stderr, "short input file\n");
    exit(2);
  }
};

inline void write(FILE* f, const std::vector<float>& v) { fwrite(v.data(), 4, v.size(), f); }
inline void write(FILE* f, const Store& s, size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = s.get(i);
  write(f, v);
}
