// The packer of the bitmap format (format.py, bitmap_spmm.cpp): one pass to count and one to copy, single-threaded.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {
constexpr int GW = 16;  // columns per bitmap word
constexpr int PAD = 32;  // zero values after the last non-zero (format.py)
}

// w: (out, in) fp32 contiguous -> [bits int16 (out, G), values (nnz + 32) in `vdtype` (0 fp32, 1 fp16,
// 2 bf16: rounded as torch's .to() rounds; 3 int8: nearbyint(w / scale) clamped to [-127, 127], 0 where the
// scale is 0), row_ptr int64 (out + 1), stats fp32 (2,) = (max |w|, 1 if every weight is finite else 0),
// scales fp32 (out,) = max |w_r| / 127 for int8, else empty]. Single-threaded, two passes over w: the format
// of format.py (and its quantize_rows), bit for bit.
std::vector<torch::Tensor> pack_bitmap(torch::Tensor w, int64_t vdtype) {
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous float32 (out, in)");
  TORCH_CHECK(vdtype >= 0 && vdtype <= 3, "vdtype must be 0 (fp32), 1 (fp16), 2 (bf16) or 3 (int8)");
  const int64_t out = w.size(0), n = w.size(1), G = (n + GW - 1) / GW;
  auto bits = torch::empty({out, G}, torch::kInt16);
  auto row_ptr = torch::empty({out + 1}, torch::kInt64);
  const float* p = w.data_ptr<float>();
  uint16_t* b = (uint16_t*)bits.data_ptr<int16_t>();
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  auto scales = torch::empty({vdtype == 3 ? out : 0}, torch::kFloat32);
  float amax = 0.f;
  bool finite = true;
  rp[0] = 0;
  for (int64_t r = 0; r < out; ++r) {
    int64_t cnt = 0;
    float ramax = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float* q = p + r * n + g * GW;
      const int m = (int)std::min<int64_t>(GW, n - g * GW);
      uint32_t word = 0;
      for (int k = 0; k < m; ++k) {
        const float v = q[k], a = std::fabs(v);
        word |= (uint32_t)(v != 0.f) << k;
        finite &= a <= 3.402823466e38f;  // false for inf and NaN
        ramax = a > ramax ? a : ramax;
      }
      b[r * G + g] = (uint16_t)word;
      cnt += __builtin_popcount(word);
    }
    rp[r + 1] = rp[r] + cnt;
    amax = ramax > amax ? ramax : amax;
    if (vdtype == 3) scales.data_ptr<float>()[r] = ramax / 127.f;
  }
  const int64_t nnz = rp[out];
  const auto dt = vdtype == 0 ? torch::kFloat32 : vdtype == 1 ? torch::kFloat16 : vdtype == 2 ? torch::kBFloat16 : torch::kInt8;
  auto values = torch::zeros({nnz + PAD}, dt);
  auto fill = [&](auto* dst) {
    int64_t k = 0;
    for (int64_t i = 0; i < out * n; ++i)
      if (p[i] != 0.f) dst[k++] = std::remove_pointer_t<decltype(dst)>(p[i]);
  };
  if (vdtype == 0) fill(values.data_ptr<float>());
  else if (vdtype == 1) fill(values.data_ptr<at::Half>());
  else if (vdtype == 2) fill(values.data_ptr<at::BFloat16>());
  else if (finite) {  // NaN/inf weights are refused by the caller: nothing to quantize
    int8_t* dst = values.data_ptr<int8_t>();
    const float* sc = scales.data_ptr<float>();
    int64_t k = 0;
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < n; ++j) {
        const float v = p[r * n + j];
        if (v == 0.f) continue;
        const float q = sc[r] > 0.f ? std::nearbyint(v / sc[r]) : 0.f;  // half to even, as torch.round
        dst[k++] = (int8_t)std::min(127.f, std::max(-127.f, q));
      }
  }
  auto stats = torch::tensor({amax, finite ? 1.f : 0.f});
  return {bits, values, row_ptr, stats, scales};
}
