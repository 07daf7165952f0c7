// Runs csrc/cuda's sm_80 attention forward and backward (rewritten by build.py) on the host.
// Usage: attention_harness DIR. DIR/cfg.txt holds the problem (see attention.py's
// write_case), DIR/{q,k,v,mask,kp,go}.bin the raw storage of each input (strided views keep
// their strides); the harness writes DIR/{out,lse,dq,dk,dv}.bin, outputs in [B, L, H, D]
// order (heads inside, as MultiheadAttention's layout), filled with NaN before the kernels run.
#include "emu_runtime.h"

#include <fstream>
#include <iterator>
#include <string>

#include "attention_fwd.cu"
#include "attention_bwd.cu"

namespace seqkern::cuda {
// The Hopper forward is not emulated; compute capability 8 never selects it.
cudaError_t attention_fwd_sm90(const AttentionParams&, void*, const int64_t*, float*,
                               cudaStream_t) {
  return cudaErrorNotSupported;
}
}  // namespace seqkern::cuda

using namespace seqkern::cuda;

namespace {
constexpr uint16_t kNaN16 = 0x7fff;  // NaN as fp16 and as bf16

std::vector<char> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}
void dump(const std::string& path, const void* p, size_t n) {
  std::ofstream(path, std::ios::binary).write(static_cast<const char*>(p), n);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  std::ifstream cfg(dir + "/cfg.txt");
  AttentionParams p;
  int dtype, causal, mask_kind, has_kp;
  double scale, dropout_p;
  cfg >> dtype >> p.B >> p.Hq >> p.Hkv >> p.L >> p.S >> p.D >> p.Dv >> causal >> mask_kind >>
      has_kp >> dropout_p >> p.seed >> p.offset >> scale;
  int64_t st[6][4];  // strides of q, k, v, mask, grad_out, key_padding_mask (2 used)
  for (auto& s : st)
    for (auto& x : s) cfg >> x;
  if (!cfg) return 2;
  p.dtype = static_cast<DType>(dtype);
  p.causal = causal;
  p.mask_kind = static_cast<MaskKind>(mask_kind);
  p.dropout_p = static_cast<float>(dropout_p);
  p.scale = static_cast<float>(scale);
  auto q = slurp(dir + "/q.bin"), k = slurp(dir + "/k.bin"), v = slurp(dir + "/v.bin"),
       mask = slurp(dir + "/mask.bin"), kp = slurp(dir + "/kp.bin"),
       go = slurp(dir + "/go.bin");
  p.q.data = q.data(), p.k.data = k.data(), p.v.data = v.data();
  for (int d = 0; d < 4; ++d)
    p.q.stride[d] = st[0][d], p.k.stride[d] = st[1][d], p.v.stride[d] = st[2][d];
  if (p.mask_kind != MaskKind::kNone) {
    p.mask.data = mask.data();
    for (int d = 0; d < 4; ++d) p.mask.stride[d] = st[3][d];
  }
  if (has_kp) {
    p.key_padding = reinterpret_cast<const bool*>(kp.data());
    p.kp_stride_b = st[5][0], p.kp_stride_s = st[5][1];
  }
  if (!attention_fwd_supported(p) || !attention_bwd_supported(p)) {
    fprintf(stderr, "not supported\n");
    return 1;
  }
  const int64_t B = p.B, L = p.L, S = p.S, Hq = p.Hq, Hkv = p.Hkv, D = p.D, Dv = p.Dv;
  std::vector<uint16_t> out(B * L * Hq * Dv, kNaN16);
  std::vector<float> lse(B * Hq * L, NAN);
  const int64_t os[4] = {L * Hq * Dv, Dv, Hq * Dv, 1};
  cudaError_t e = attention_fwd(p, out.data(), os, lse.data(), nullptr);
  if (e != cudaSuccess) {
    fprintf(stderr, "attention_fwd: error %d\n", int(e));
    return 1;
  }
  std::vector<uint16_t> dq(B * L * Hq * D, kNaN16), dk(B * S * Hkv * D, kNaN16),
      dv(B * S * Hkv * Dv, kNaN16);
  const int64_t qs[4] = {L * Hq * D, D, Hq * D, 1};
  const int64_t ks[4] = {S * Hkv * D, D, Hkv * D, 1};
  const int64_t vs[4] = {S * Hkv * Dv, Dv, Hkv * Dv, 1};
  void* ws = emu_device_alloc(attention_bwd_workspace_bytes(p));
  e = attention_bwd(p, go.data(), st[4], out.data(), os, lse.data(), dq.data(), qs, dk.data(), ks,
                    dv.data(), vs, ws, nullptr);
  if (e != cudaSuccess) {
    fprintf(stderr, "attention_bwd: error %d\n", int(e));
    return 1;
  }
  dump(dir + "/out.bin", out.data(), out.size() * 2);
  dump(dir + "/lse.bin", lse.data(), lse.size() * 4);
  dump(dir + "/dq.bin", dq.data(), dq.size() * 2);
  dump(dir + "/dk.bin", dk.data(), dk.size() * 2);
  dump(dir + "/dv.bin", dv.data(), dv.size() * 2);
  return 0;
}
