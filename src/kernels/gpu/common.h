// Shared device code of sapo's GPU kernels, in the common subset of CUDA C++ and the Metal
// Shading Language: storage loads and stores (f32, f16, bf16, u8 read in place; f16/bf16
// converted by bit operations, so that no CUDA header and no MSL 3.1 `bfloat` is needed), and
// deterministic block reductions (a fixed tree of warp/SIMD-group shuffles, then the warps in
// order; no atomics).
//
// The dialect is chosen by the compiler: nvcc (`build.rs`) gives CUDA, Apple's Metal compiler
// (`__METAL_VERSION__`, the source bundled at run time by `gpu/metal.rs`) gives MSL. For tests,
// g++ compiles both with the shim `shim.h` (`SAPO_METAL` selects the Metal side), which runs one
// std::thread per GPU thread on the CPU; before that, clang checks the Metal program's address
// spaces and built-ins against `msl/metal_stdlib` (`sim.rs`).
//
// What differs between the dialects is named here once: address spaces (`SAPO_GLOBAL` device
// memory, `SAPO_SHARED` block/threadgroup memory, `SAPO_THREAD` a thread's own), the thread's
// place (`SapoThread`, built by each entry point: CUDA reads `threadIdx`, Metal takes kernel
// attributes), shuffles, barriers, the math functions, and the wide accumulator (`sapo_wide`:
// f64 on CUDA; Metal has no f64, so f32 there).
#pragma once

#if defined(__METAL_VERSION__) || defined(SAPO_METAL)
#define SAPO_METAL_DIALECT 1
#endif

#ifdef __METAL_VERSION__
#include <metal_stdlib>
using namespace metal;
#endif

// The largest block (threadgroup) any sapo kernel is launched with.
#define SAPO_MAX_BLOCK 1024

#ifdef SAPO_METAL_DIALECT
#define SAPO_INLINE inline
#define SAPO_DEVICE
#define SAPO_GLOBAL device
#define SAPO_SHARED threadgroup
#define SAPO_THREAD thread
#ifndef SAPO_SHARED_DECL
#define SAPO_SHARED_DECL threadgroup
#endif
// Apple GPUs run SIMD groups of 32; the simulation also runs 8, so scratch is sized for 8.
#define SAPO_MAX_WARPS (SAPO_MAX_BLOCK / 8)
typedef float sapo_wide;
typedef long sapo_i64;
inline float sapo_bits_to_float(unsigned x) { return as_type<float>(x); }
inline unsigned sapo_float_to_bits(float x) { return as_type<unsigned>(x); }
#define sapo_exp(x) precise::exp(x)
#define sapo_log(x) precise::log(x)
#define sapo_atan(x) precise::atan(x)
template <typename T> inline T sapo_shuffle_xor(T v, unsigned mask) {
  return simd_shuffle_xor(v, (ushort)mask);
}
inline void sapo_barrier() { threadgroup_barrier(mem_flags::mem_threadgroup); }
#else
#define SAPO_INLINE __device__ __forceinline__
#define SAPO_DEVICE __device__
#define SAPO_GLOBAL
#define SAPO_SHARED
#define SAPO_THREAD
#define SAPO_SHARED_DECL __shared__
#define SAPO_MAX_WARPS (SAPO_MAX_BLOCK / 32)
typedef double sapo_wide;
typedef long long sapo_i64;
SAPO_INLINE float sapo_bits_to_float(unsigned x) { return __uint_as_float(x); }
SAPO_INLINE unsigned sapo_float_to_bits(float x) { return __float_as_uint(x); }
#define sapo_exp(x) expf(x)
#define sapo_log(x) logf(x)
#define sapo_atan(x) atanf(x)
template <typename T> SAPO_INLINE T sapo_shuffle_xor(T v, unsigned mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}
SAPO_INLINE void sapo_barrier() { __syncthreads(); }
#endif

// A thread's place: its index in the block, the block's index, the block's size, and the
// warp / SIMD-group width (32 on CUDA and on Apple GPUs).
struct SapoThread {
  unsigned index, block, threads, simd_width;
};

#ifdef SAPO_METAL_DIALECT
inline SapoThread sapo_metal_thread(unsigned index, unsigned block, unsigned threads,
                                    unsigned simd_width) {
  SapoThread th;
  th.index = index;
  th.block = block;
  th.threads = threads;
  th.simd_width = simd_width;
  return th;
}
// The last parameters of every Metal entry point (1-D dispatches), and the place they give.
#define SAPO_METAL_PLACE                                                                  \
  uint sapo_index [[thread_position_in_threadgroup]],                                     \
      uint sapo_block [[threadgroup_position_in_grid]],                                   \
      uint sapo_threads [[threads_per_threadgroup]],                                      \
      uint sapo_simd_width [[threads_per_simdgroup]]
#define SAPO_METAL_THREAD sapo_metal_thread(sapo_index, sapo_block, sapo_threads, sapo_simd_width)
#else
SAPO_INLINE SapoThread sapo_cuda_thread() {
  SapoThread th;
  th.index = threadIdx.x;
  th.block = blockIdx.x;
  th.threads = blockDim.x;
  th.simd_width = 32;
  return th;
}
#endif

typedef unsigned short sapo_half;  // f16 bits
typedef unsigned short sapo_bf16;  // bf16 bits

#define SAPO_INF sapo_bits_to_float(0x7f800000u)
#define SAPO_NAN sapo_bits_to_float(0x7fc00000u)

SAPO_INLINE bool sapo_isfinite(float x) {
  return (sapo_float_to_bits(x) & 0x7f800000u) != 0x7f800000u;
}

// erf x. CUDA has erff; MSL has none, so Metal takes the odd Taylor series below 0.5 (6 terms,
// error < 2e-8) and Abramowitz–Stegun 7.1.26 above (absolute error < 1.5e-7).
SAPO_INLINE float sapo_erf(float x) {
#ifdef SAPO_METAL_DIALECT
  float a = x < 0.0f ? -x : x;
  float r;
  if (a < 0.5f) {
    float a2 = a * a;
    r = 1.12837916709551257f * a *
        (1.0f + a2 * (-1.0f / 3.0f + a2 * (0.1f + a2 * (-1.0f / 42.0f + a2 * (1.0f / 216.0f +
                                                                         a2 * (-1.0f / 1320.0f))))));
  } else {
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                                                            t * (-1.453152027f + t * 1.061405429f))));
    r = 1.0f - poly * sapo_exp(-a * a);
  }
  return x < 0.0f ? -r : r;
#else
  return erff(x);
#endif
}

// e^x − 1 without cancellation near 0. CUDA has expm1f; MSL has no expm1, so Metal takes
// Kahan's form (exact to a few ulp without fast math): (u − 1)·x / ln u with u = e^x.
SAPO_INLINE float sapo_expm1(float x) {
#ifdef SAPO_METAL_DIALECT
  float u = sapo_exp(x);
  if (u == 1.0f) return x;
  float um1 = u - 1.0f;
  if (um1 == -1.0f || !sapo_isfinite(u)) return um1;
  return um1 * x / sapo_log(u);
#else
  return expm1f(x);
#endif
}

// f16 bits → f32 (exact, subnormals, inf and NaN included).
SAPO_INLINE float sapo_f16_to_f32(sapo_half h) {
  unsigned sign = (unsigned)(h & 0x8000u) << 16;
  unsigned exponent = (h >> 10) & 0x1fu;
  unsigned mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = (float)mantissa * 5.9604644775390625e-8f;  // 2^-24
  } else if (exponent == 31) {
    magnitude = sapo_bits_to_float(0x7f800000u | (mantissa << 13));
  } else {
    magnitude = sapo_bits_to_float(((exponent + 112u) << 23) | (mantissa << 13));
  }
  return sapo_bits_to_float(sapo_float_to_bits(magnitude) | sign);
}

// f32 → f16 bits, round to nearest even (as `half::f16::from_f32`).
SAPO_INLINE sapo_half sapo_f32_to_f16(float f) {
  unsigned x = sapo_float_to_bits(f);
  unsigned sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  unsigned out;
  if (x >= 0x47800000u) {  // ≥ 65536 (or inf/NaN)
    out = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (x < 0x38800000u) {  // below the smallest normal f16: subnormal or 0
    // Adding 0.5 aligns the f16 subnormal's bits at the bottom of the f32 mantissa; the f32
    // addition rounds to nearest even.
    float aligned = sapo_bits_to_float(x) + 0.5f;
    out = sapo_float_to_bits(aligned) - 0x3f000000u;
  } else {
    unsigned odd = (x >> 13) & 1u;
    x += 0xc8000fffu + odd;  // rebias the exponent (−112 << 23), round half to even
    out = x >> 13;
  }
  return (sapo_half)(out | sign);
}

SAPO_INLINE float sapo_bf16_to_f32(sapo_bf16 h) {
  return sapo_bits_to_float((unsigned)h << 16);
}

// f32 → bf16 bits, round to nearest even (as `half::bf16::from_f32`).
SAPO_INLINE sapo_bf16 sapo_f32_to_bf16(float f) {
  unsigned x = sapo_float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (sapo_bf16)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (sapo_bf16)(x >> 16);
}

// Storage types: `sapo_load(p, i)` reads element `i` as f32, `sapo_store(p, i, v)` writes one.
// f16/bf16 elements are read and written through their bits: no struct is copied between
// address spaces (which upstream clang's check of the MSL program, `gpu/msl/metal_stdlib`,
// cannot follow).
template <typename T> struct Storage;
template <> struct Storage<float> {
  static SAPO_INLINE float load(SAPO_GLOBAL const float* p, long i) { return p[i]; }
  static SAPO_INLINE void store(SAPO_GLOBAL float* p, long i, float v) { p[i] = v; }
};
template <> struct Storage<unsigned char> {
  static SAPO_INLINE float load(SAPO_GLOBAL const unsigned char* p, long i) { return (float)p[i]; }
};
struct F16 { sapo_half bits; };
struct BF16 { sapo_bf16 bits; };
template <> struct Storage<F16> {
  static SAPO_INLINE float load(SAPO_GLOBAL const F16* p, long i) {
    return sapo_f16_to_f32(p[i].bits);
  }
  static SAPO_INLINE void store(SAPO_GLOBAL F16* p, long i, float v) {
    p[i].bits = sapo_f32_to_f16(v);
  }
};
template <> struct Storage<BF16> {
  static SAPO_INLINE float load(SAPO_GLOBAL const BF16* p, long i) {
    return sapo_bf16_to_f32(p[i].bits);
  }
  static SAPO_INLINE void store(SAPO_GLOBAL BF16* p, long i, float v) {
    p[i].bits = sapo_f32_to_bf16(v);
  }
};

template <typename T> SAPO_INLINE float sapo_load(SAPO_GLOBAL const T* p, long i) {
  return Storage<T>::load(p, i);
}
template <typename T> SAPO_INLINE void sapo_store(SAPO_GLOBAL T* p, long i, float v) {
  Storage<T>::store(p, i, v);
}

// ---- Deterministic reductions: every thread of the block gets the same bits. ----

template <typename T> SAPO_INLINE T sapo_warp_sum(T v, SapoThread th) {
  for (unsigned offset = th.simd_width / 2; offset > 0; offset >>= 1)
    v += sapo_shuffle_xor(v, offset);
  return v;
}
template <typename T> SAPO_INLINE T sapo_warp_min(T v, SapoThread th) {
  for (unsigned offset = th.simd_width / 2; offset > 0; offset >>= 1) {
    T o = sapo_shuffle_xor(v, offset);
    v = o < v ? o : v;
  }
  return v;
}
template <typename T> SAPO_INLINE T sapo_warp_max(T v, SapoThread th) {
  for (unsigned offset = th.simd_width / 2; offset > 0; offset >>= 1) {
    T o = sapo_shuffle_xor(v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// Sums K values per thread over the block (its size a multiple of the SIMD width): a shuffle
// tree within each warp, then the warps' totals in warp order. `scratch` is shared memory of
// K·SAPO_MAX_WARPS values. On return every thread's `v` holds the block totals.
template <int K, typename T>
SAPO_INLINE void sapo_block_sum(SAPO_THREAD T* v, SAPO_SHARED T* scratch, SapoThread th) {
  const unsigned lane = th.index % th.simd_width, warp = th.index / th.simd_width;
  const unsigned warps = th.threads / th.simd_width;
  for (int k = 0; k < K; ++k) {
    T s = sapo_warp_sum(v[k], th);
    if (lane == 0) scratch[k * SAPO_MAX_WARPS + warp] = s;
  }
  sapo_barrier();
  for (int k = 0; k < K; ++k) {
    T s = 0;
    for (unsigned w = 0; w < warps; ++w) s += scratch[k * SAPO_MAX_WARPS + w];
    v[k] = s;
  }
  sapo_barrier();
}

// Minimum and maximum over the block, as `sapo_block_sum`; `scratch` holds 2·SAPO_MAX_WARPS.
template <typename T>
SAPO_INLINE void sapo_block_min_max(SAPO_THREAD T& lo, SAPO_THREAD T& hi, SAPO_SHARED T* scratch,
                                    SapoThread th) {
  const unsigned lane = th.index % th.simd_width, warp = th.index / th.simd_width;
  const unsigned warps = th.threads / th.simd_width;
  T l = sapo_warp_min(lo, th), h = sapo_warp_max(hi, th);
  if (lane == 0) {
    scratch[warp] = l;
    scratch[SAPO_MAX_WARPS + warp] = h;
  }
  sapo_barrier();
  l = scratch[0];
  h = scratch[SAPO_MAX_WARPS];
  for (unsigned w = 1; w < warps; ++w) {
    T a = scratch[w], b = scratch[SAPO_MAX_WARPS + w];
    l = a < l ? a : l;
    h = b > h ? b : h;
  }
  lo = l;
  hi = h;
  sapo_barrier();
}
