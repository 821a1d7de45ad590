// Sparse (bitmap + packed values) times dense, fp32 accumulation; see sparsellm/kernels/format.py for the format.
//
//   row_ptr  int64 (out + 1)      offset of row r's first value in `values`
//   bits     int16 (out, G)       G = in_pad / 16; bit k of bits[r, g] is set iff W[r, 16 g + k] != 0
//   values   fp32/fp16/bf16/int8 (nnz + 32)   the non-zeros, row-major, 32 elements of zero padding at the end
//   scales   fp32 (out)           int8 values only: row r's weights are scales[r] * values
//   x        fp32 (T, in_pad)     rows of activations, zero-padded to in_pad columns
//
// expand_mm (decode, T <= 8 per pass): for each 16-column group, expand the group's packed values into a
//   16-lane weight vector with its bitmap (AVX-512 vexpandps, or an AVX2 permutation table), FMA it with the
//   same 16 columns of each token. The weight bytes are read once per 8 tokens. The work is dense-shaped
//   and bound by port 5 (kmov, vexpandps, vcvtph2ps: ~5 cycles a group on this Xeon), not by the bytes,
//   on one core; fp16, bf16 and int8 values at 1-2 tokens take two groups a step with vpexpandw where the CPU has
//   AVX512-VBMI2 (expand2_rows, 1.4x), which reaches the memory bandwidth at 2 threads on 7B shapes.
// tiled_mm (prefill): tokens are transposed into tiles xt (tiles, in_pad, TT); each row's column offsets
//   and fp32 values are decoded once per call, then, per tile and per block of columns (kept in cache),
//   every non-zero adds value * xt[col, :] to TT accumulators (TT/16 or TT/8 vectors) held in registers.
//   The work is nnz * T FMAs, so it shrinks with the sparsity.
// int8 values are converted to fp32 (exact) where the other types are, summed with x in fp32 like them, and
//   each row's finished sum is multiplied by its scale (scale_row below).
// Threads: OpenMP over rows (and tiles), `threads` taken from torch.get_num_threads() by the caller.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

enum VT { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 };

#if defined(__AVX512F__)
constexpr int W = 16;  // lanes per vector, and columns per bitmap word handled at once
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
template <int V> inline vec vals16(const void* p) {
  if constexpr (V == F32) {
    vec r = _mm512_loadu_ps((const float*)p);
    asm("" : "+v"(r));  // keeps gcc from fusing the load into vexpandps (mem), which is microcoded on Zen 4
    return r;
  } else if constexpr (V == F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
  else if constexpr (V == I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
// the group's weights: packed values at p expanded to the lanes whose bit is set in m
template <int V> inline vec expand(uint32_t m, const void* p) { return _mm512_maskz_expand_ps((__mmask16)m, vals16<V>(p)); }
inline int decode_idx(uint32_t m, int base, int32_t* out) {  // column indices of the set bits, times nothing
  __m512i iota = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(base));
  _mm512_storeu_si512(out, _mm512_maskz_compress_epi32((__mmask16)m, iota));
  return __builtin_popcount(m);
}
const char* ISA = "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
template <int V> inline vec vals8(const void* p) {
  if constexpr (V == F32) return _mm256_loadu_ps((const float*)p);
  else if constexpr (V == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  else if constexpr (V == I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
struct Table {  // for each 8-bit mask: the permutation that moves packed lane i to the i-th set bit
  alignas(32) int32_t perm[256][8];
  Table() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j) perm[m][j] = (m >> j & 1) ? k++ : 0;
    }
  }
};
const Table TABLE;
template <int V> inline vec expand(uint32_t m, const void* p) {
  vec v = _mm256_permutevar8x32_ps(vals8<V>(p), _mm256_load_si256((const __m256i*)TABLE.perm[m]));
  __m256i bit = _mm256_and_si256(_mm256_set1_epi32((int)m), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
  return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(bit, _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128))));
}
inline int decode_idx(uint32_t m, int base, int32_t* out) {
  int n = 0;
  while (m) { out[n++] = base + __builtin_ctz(m); m &= m - 1; }
  return n;
}
const char* ISA = "avx2";
#else
#error "sparsellm kernels need AVX2, FMA and F16C (or AVX-512)"
#endif

constexpr int GW = 16;  // columns per bitmap word

template <int V> constexpr int vbytes() { return V == F32 ? 4 : V == I8 ? 1 : 2; }

// row r's finished sum: times its scale for int8 values, as it is for the float types (scales is null)
template <int V> inline float scale_row(float sum, const float* scales, int64_t r) {
  if constexpr (V == I8) return sum * scales[r];
  else return sum;
}

// rows [r0, r1) for T tokens (T <= 8): y[t, r] = sum_j W[r, j] x[t, j]
template <int V, int T>
void expand_rows(const int64_t* row_ptr, const uint16_t* bits, const char* values, const float* scales, const float* x,
                 int64_t G, float* y, int64_t out, int64_t r0, int64_t r1) {
  const int64_t ld = G * GW;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* b = bits + r * G;
    const char* v = values + row_ptr[r] * vbytes<V>();
    vec acc0[T], acc1[T];  // two accumulator chains, so the FMA latency is hidden at batch 1
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = vzero();
    for (int64_t g = 0; g < G; ++g) {
      uint32_t m = b[g];
#if defined(__AVX512F__)
      const float* xp = x + g * GW;
      if (g + 1 < G) {  // two groups per step, one accumulator chain each
        uint32_t m1 = b[g + 1];
        vec w0 = expand<V>(m, v);
        v += __builtin_popcount(m) * vbytes<V>();
        vec w1 = expand<V>(m1, v);
        v += __builtin_popcount(m1) * vbytes<V>();
        _mm_prefetch(v + 512, _MM_HINT_T0);
        for (int t = 0; t < T; ++t) {
          acc0[t] = vfma(w0, vload(xp + t * ld), acc0[t]);
          acc1[t] = vfma(w1, vload(xp + t * ld + GW), acc1[t]);
        }
        ++g;
        continue;
      }
      vec w = expand<V>(m, v);
      v += __builtin_popcount(m) * vbytes<V>();
      for (int t = 0; t < T; ++t) acc0[t] = vfma(w, vload(xp + t * ld), acc0[t]);
#else
      uint32_t lo = m & 0xff, hi = m >> 8;
      vec w0 = expand<V>(lo, v);
      v += __builtin_popcount(lo) * vbytes<V>();
      vec w1 = expand<V>(hi, v);
      v += __builtin_popcount(hi) * vbytes<V>();
      const float* xp = x + g * GW;
      for (int t = 0; t < T; ++t) {
        acc0[t] = vfma(w0, vload(xp + t * ld), acc0[t]);
        acc1[t] = vfma(w1, vload(xp + t * ld + 8), acc1[t]);
      }
#endif
    }
    for (int t = 0; t < T; ++t) y[t * out + r] = scale_row<V>(vsum(acc0[t]) + vsum(acc1[t]), scales, r);
  }
}

#if defined(__AVX512VBMI2__)
// fp16, bf16 and int8 values at T <= 2 tokens with AVX512-VBMI2: two groups (32 columns) per step. The two
// groups' 32-bit bitmap is loaded straight into a mask register and their values are expanded as 16-bit
// words (vpexpandw) or bytes (vpexpandb), then converted in two halves. The one-group path spends a kmov, a
// vexpandps and a conversion on port 5 per group, and port 5 sets its pace; this one spends fewer per group:
// fp16 1.4x on 4096 x 4096 at 70%, one thread (bench/kernel_shapes_micro.py). R rows at once: R independent
// pointer chains; the prefetch is 1.34x on 7B-shaped blocks read from memory (sparse_kernel_bench --shape).
// the 32 columns' weights: packed values at v expanded to the lanes whose bit is set in k. It loads 32 values
// (the format's padding covers the last row) and expands in registers: the memory form of vpexpand is
// microcoded on Zen 4.
template <int V> inline void expand2(__mmask32 k, const char* v, vec& w0, vec& w1) {
  if constexpr (V == I8) {
    const __m256i e = _mm256_maskz_expand_epi8(k, _mm256_loadu_si256((const __m256i*)v));
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(e)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(e, 1)));
  } else {
    const __m512i e = _mm512_maskz_expand_epi16(k, _mm512_loadu_si512(v));
    const __m256i lo = _mm512_castsi512_si256(e), hi = _mm512_extracti64x4_epi64(e, 1);
    if constexpr (V == F16) {
      w0 = _mm512_cvtph_ps(lo);
      w1 = _mm512_cvtph_ps(hi);
    } else {
      w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo), 16));
      w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
    }
  }
}
template <int V, int T, int R>
void expand2_rows(const int64_t* row_ptr, const uint16_t* bits, const char* values, const float* scales, const float* x,
                  int64_t G, float* y, int64_t out, int64_t r0, int64_t r1) {
  const int64_t ld = G * GW, P = G / 2;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const char* v[R];
    vec a[R][T], b[R][T];
    for (int i = 0; i < R; ++i) {
      v[i] = values + row_ptr[r + i] * vbytes<V>();
      for (int t = 0; t < T; ++t) a[i][t] = b[i][t] = vzero();
    }
    for (int64_t p = 0; p < P; ++p) {
      vec x0[T], x1[T];
      for (int t = 0; t < T; ++t) {
        x0[t] = vload(x + t * ld + p * 2 * GW);
        x1[t] = vload(x + t * ld + p * 2 * GW + GW);
      }
      for (int i = 0; i < R; ++i) {
        const __mmask32 k = _load_mask32((__mmask32*)(bits + (r + i) * G + 2 * p));
        _mm_prefetch(v[i] + 512, _MM_HINT_T0);
        vec w0, w1;
        expand2<V>(k, v[i], w0, w1);
        v[i] += __builtin_popcount(_cvtmask32_u32(k)) * vbytes<V>();
        for (int t = 0; t < T; ++t) {
          a[i][t] = vfma(w0, x0[t], a[i][t]);
          b[i][t] = vfma(w1, x1[t], b[i][t]);
        }
      }
    }
    if (G % 2)  // the last group on its own
      for (int i = 0; i < R; ++i) {
        const vec w = expand<V>(bits[(r + i) * G + G - 1], v[i]);
        for (int t = 0; t < T; ++t) a[i][t] = vfma(w, vload(x + t * ld + (G - 1) * GW), a[i][t]);
      }
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < T; ++t) y[t * out + r + i] = scale_row<V>(vsum(_mm512_add_ps(a[i][t], b[i][t])), scales, r + i);
  }
  if constexpr (R > 1)
    if (r < r1) expand2_rows<V, T, 1>(row_ptr, bits, values, scales, x, G, y, out, r, r1);
}
constexpr bool HAS_EXPAND2 = true;
#else
template <int V, int T, int R>
void expand2_rows(const int64_t*, const uint16_t*, const char*, const float*, const float*, int64_t, float*, int64_t,
                  int64_t, int64_t) {}
constexpr bool HAS_EXPAND2 = false;
#endif

template <int V>
void expand_mm(const int64_t* row_ptr, const uint16_t* bits, const char* values, const float* scales, const float* x,
               int64_t T, int64_t G, float* y, int64_t out, int threads) {
  const int64_t ld = G * GW;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < threads; ++c) {
    const int64_t r0 = out * c / threads, r1 = out * (c + 1) / threads;
    for (int64_t t0 = 0; t0 < T; t0 += 8) {
      const float* xp = x + t0 * ld;
      float* yp = y + t0 * out;
      const int64_t n = T - t0 < 8 ? T - t0 : 8;
      if (V != F32 && HAS_EXPAND2 && n <= 2) {
        if (n == 1) expand2_rows<V, 1, 4>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1);
        else expand2_rows<V, 2, 4>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1);
        continue;
      }
      switch (n) {
        case 1: expand_rows<V, 1>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
        case 2: expand_rows<V, 2>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
        case 3: expand_rows<V, 3>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
        case 4: expand_rows<V, 4>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
        case 5: expand_rows<V, 5>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
        case 6: expand_rows<V, 6>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
        case 7: expand_rows<V, 7>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
        default: expand_rows<V, 8>(row_ptr, bits, values, scales, xp, G, yp, out, r0, r1); break;
      }
    }
  }
}

// value k of a row, as fp32
template <int V> inline float value_at(const char* v, int64_t k) {
  if constexpr (V == F32) return ((const float*)v)[k];
  if constexpr (V == I8) return (float)((const int8_t*)v)[k];
  uint32_t h = ((const uint16_t*)v)[k];
  if constexpr (V == F16) return _cvtsh_ss((unsigned short)h);
  uint32_t u = h << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Prefill, decoded once per call: every row's column offsets (column * TT, int32) and fp32 values are
// decoded into idx/val once and reused by every token tile; the columns are taken in blocks of `cbg` groups
// (cbg * 16 columns of a tile: cbg * 16 * TT * 4 bytes of xt, sized to stay in L1/L2) and each thread keeps
// its own rows' accumulators for the block in registers, adding the block's sum into yt (int8: the last
// block multiplies the row's sum by its scale).
template <int V, int NV>
void tiled_mm(const int64_t* row_ptr, const uint16_t* bits, const char* values, const float* scales, const float* xt,
              int64_t tiles, int64_t G, float* yt, int64_t out, int threads, int64_t cbg) {
  constexpr int TT = NV * W;
  const int64_t in_pad = G * GW, nnz = row_ptr[out], nb = (G + cbg - 1) / cbg;
  std::vector<int32_t> idx(nnz + GW);
  std::vector<float> val(nnz + GW);
  std::vector<int64_t> boff(out * (nb + 1));  // boff[r, b]: row r's first non-zero in column block b
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t r0 = out * me / nt, r1 = out * (me + 1) / nt;
    int32_t buf[GW];
    for (int64_t r = r0; r < r1; ++r) {
      int64_t k = row_ptr[r];
      const char* v = values + k * vbytes<V>();
      for (int64_t g = 0; g < G; ++g) {
        if (g % cbg == 0) boff[r * (nb + 1) + g / cbg] = k;
        const int n = decode_idx(bits[r * G + g], (int)(g * GW), buf);
        for (int j = 0; j < n; ++j) idx[k + j] = buf[j] * TT;
        k += n;
      }
      boff[r * (nb + 1) + nb] = k;
      for (int64_t j = row_ptr[r]; j < k; ++j) val[j] = value_at<V>(v, j - row_ptr[r]);
    }
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const float* xb = xt + tile * in_pad * TT;
      float* yb = yt + tile * out * TT;
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t k0 = boff[r * (nb + 1) + b], k1 = boff[r * (nb + 1) + b + 1];
          vec acc[NV];
          for (int u = 0; u < NV; ++u) acc[u] = b ? vload(yb + r * TT + u * W) : vzero();
          for (int64_t k = k0; k < k1; ++k) {
            const vec a = vset1(val[k]);
            const float* xp = xb + idx[k];
            for (int u = 0; u < NV; ++u) acc[u] = vfma(a, vload(xp + u * W), acc[u]);
          }
          if constexpr (V == I8) {
            if (b == nb - 1)
              for (int u = 0; u < NV; ++u) acc[u] = vmul(acc[u], vset1(scales[r]));
          }
          for (int u = 0; u < NV; ++u) vstore(yb + r * TT + u * W, acc[u]);
        }
      }
    }
  }
}

void check(const torch::Tensor& row_ptr, const torch::Tensor& bits, const torch::Tensor& values, const torch::Tensor& x) {
  TORCH_CHECK(row_ptr.dtype() == torch::kInt64 && row_ptr.is_contiguous(), "row_ptr must be contiguous int64");
  TORCH_CHECK(bits.dtype() == torch::kInt16 && bits.is_contiguous() && bits.dim() == 2, "bits must be contiguous int16 (out, G)");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  TORCH_CHECK(row_ptr.numel() == bits.size(0) + 1, "row_ptr must have out + 1 entries");
  TORCH_CHECK(values.numel() >= row_ptr.data_ptr<int64_t>()[bits.size(0)] + 32, "values must end with 32 values of padding (format.py)");
}

// the scales' pointer: int8 values need fp32 (out) scales; the float types take none
const float* scales_of(const torch::Tensor& values, const std::optional<torch::Tensor>& scales, int64_t out) {
  if (values.dtype() != torch::kInt8) {
    TORCH_CHECK(!scales.has_value(), "scales are for int8 values only");
    return nullptr;
  }
  TORCH_CHECK(scales.has_value(), "int8 values need their fp32 row scales");
  const auto& s = *scales;
  TORCH_CHECK(s.dtype() == torch::kFloat32 && s.is_contiguous() && s.dim() == 1 && s.size(0) == out,
              "scales must be contiguous float32 (out,)");
  return s.data_ptr<float>();
}

template <typename F> void by_dtype(const torch::Tensor& values, F f) {
  if (values.dtype() == torch::kFloat32) f(std::integral_constant<int, F32>());
  else if (values.dtype() == torch::kFloat16) f(std::integral_constant<int, F16>());
  else if (values.dtype() == torch::kBFloat16) f(std::integral_constant<int, BF16>());
  else if (values.dtype() == torch::kInt8) f(std::integral_constant<int, I8>());
  else TORCH_CHECK(false, "values must be float32, float16, bfloat16 or int8");
}

}  // namespace

// x: (T, in_pad) fp32 -> (T, out) fp32; scales: fp32 (out,) for int8 values, None otherwise
torch::Tensor spmm_expand(torch::Tensor row_ptr, torch::Tensor bits, torch::Tensor values, torch::Tensor x, int64_t threads,
                          std::optional<torch::Tensor> scales) {
  check(row_ptr, bits, values, x);
  const int64_t out = bits.size(0), G = bits.size(1), T = x.size(0);
  const float* sp = scales_of(values, scales, out);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == G * GW, "x must be (T, in_pad)");
  auto y = torch::empty({T, out}, x.options());
  // a thread per 64k weights at most, about torch's own grain: on a quiet 2-core machine a 576 x 576 decode
  // multiply takes 13 us at 2 threads against 21 at one (bench/kernel_shapes_micro.py). A loaded machine
  // is another matter (each parallel region waits for a descheduled thread: SmolLM2-135M decode at 4.3
  // tok/s with one kernel thread against 2.6 with two, at load 8); give it fewer threads (--threads).
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(threads, out * G * GW / (1 << 16)));
  by_dtype(values, [&](auto V) {
    expand_mm<decltype(V)::value>(row_ptr.data_ptr<int64_t>(), (const uint16_t*)bits.data_ptr<int16_t>(),
                                  (const char*)values.data_ptr(), sp, x.data_ptr<float>(), T, G, y.data_ptr<float>(), out, nt);
  });
  return y;
}

// xt: (tiles, in_pad, TT) fp32 with TT = tile_vectors * lanes -> yt: (tiles, out, TT) fp32, through tiled_mm
// with column blocks of `cbg` bitmap groups (>= G: no blocking); scales as spmm_expand's
torch::Tensor spmm_tiled(torch::Tensor row_ptr, torch::Tensor bits, torch::Tensor values, torch::Tensor xt, int64_t threads,
                         int64_t cbg, std::optional<torch::Tensor> scales) {
  check(row_ptr, bits, values, xt);
  const int64_t out = bits.size(0), G = bits.size(1);
  const float* sp = scales_of(values, scales, out);
  TORCH_CHECK(xt.dim() == 3 && xt.size(1) == G * GW && xt.size(2) % W == 0 && xt.size(2) <= 4 * W,
              "xt must be (tiles, in_pad, TT) with TT a multiple of the vector width, at most 4 vectors");
  TORCH_CHECK(cbg >= 1, "cbg must be >= 1");
  const int64_t tiles = xt.size(0), TT = xt.size(2);
  auto yt = torch::zeros({tiles, out, TT}, xt.options());
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>({threads, out, tiles * out * G * TT / 65536}));
  by_dtype(values, [&](auto V) {
    constexpr int v = decltype(V)::value;
    auto args = std::make_tuple(row_ptr.data_ptr<int64_t>(), (const uint16_t*)bits.data_ptr<int16_t>(),
                                (const char*)values.data_ptr(), sp, xt.data_ptr<float>(), tiles, G, yt.data_ptr<float>(), out, nt,
                                std::min(cbg, std::max<int64_t>(G, 1)));
    switch (TT / W) {
      case 1: std::apply(tiled_mm<v, 1>, args); break;
      case 2: std::apply(tiled_mm<v, 2>, args); break;
      case 3: std::apply(tiled_mm<v, 3>, args); break;
      default: std::apply(tiled_mm<v, 4>, args); break;
    }
  });
  return yt;
}

std::vector<torch::Tensor> pack_bitmap(torch::Tensor w, int64_t vdtype);  // pack_bitmap.cpp

std::string isa() { return ISA; }
int64_t lanes() { return W; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("spmm_expand", &spmm_expand, "bitmap sparse x dense, few tokens (decode)", py::arg("row_ptr"), py::arg("bits"),
        py::arg("values"), py::arg("x"), py::arg("threads"), py::arg("scales") = py::none());
  m.def("spmm_tiled", &spmm_tiled, "bitmap sparse x dense, token tiles, rows decoded once, column blocks",
        py::arg("row_ptr"), py::arg("bits"), py::arg("values"), py::arg("xt"), py::arg("threads"), py::arg("cbg"),
        py::arg("scales") = py::none());
  m.def("pack_bitmap", &pack_bitmap, "pack a dense fp32 weight into the bitmap format");
  m.def("isa", &isa, "the instruction set the kernels were compiled for");
  m.def("lanes", &lanes, "fp32 lanes per vector");
}
