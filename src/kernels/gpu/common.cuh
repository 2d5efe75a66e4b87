// Shared device code of sapo's CUDA kernels: storage loads and stores (f32, f16, bf16, u8 read
// in place; f16/bf16 converted by bit operations, so that no CUDA header is needed), and
// deterministic block reductions (a fixed tree of warp shuffles, then the warps in order; no
// atomics).
//
// The same source compiles with nvcc (to PTX, `build.rs`) and, for tests, with g++ and the
// shim `shim.h`, which runs one std::thread per GPU thread on the CPU.
#pragma once

#define SAPO_WARP 32
// The largest block any sapo kernel is launched with.
#define SAPO_MAX_BLOCK 1024

typedef unsigned short sapo_half;  // f16 bits
typedef unsigned short sapo_bf16;  // bf16 bits

#ifdef __CUDACC__
__device__ __forceinline__ float sapo_bits_to_float(unsigned x) { return __uint_as_float(x); }
__device__ __forceinline__ unsigned sapo_float_to_bits(float x) { return __float_as_uint(x); }
#endif

#define SAPO_INF sapo_bits_to_float(0x7f800000u)
#define SAPO_NAN sapo_bits_to_float(0x7fc00000u)

__device__ __forceinline__ bool sapo_isfinite(float x) {
  return (sapo_float_to_bits(x) & 0x7f800000u) != 0x7f800000u;
}

// f16 bits → f32 (exact, subnormals, inf and NaN included).
__device__ __forceinline__ float sapo_f16_to_f32(sapo_half h) {
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
__device__ __forceinline__ sapo_half sapo_f32_to_f16(float f) {
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

__device__ __forceinline__ float sapo_bf16_to_f32(sapo_bf16 h) {
  return sapo_bits_to_float((unsigned)h << 16);
}

// f32 → bf16 bits, round to nearest even (as `half::bf16::from_f32`).
__device__ __forceinline__ sapo_bf16 sapo_f32_to_bf16(float f) {
  unsigned x = sapo_float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (sapo_bf16)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (sapo_bf16)(x >> 16);
}

// Storage types: `Load<T>::f(x)` reads a value as f32, `Store<T>::f(v)` writes one.
template <typename T> struct Storage;
template <> struct Storage<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Storage<unsigned char> {
  static __device__ __forceinline__ float load(unsigned char x) { return (float)x; }
};
struct F16 { sapo_half bits; };
struct BF16 { sapo_bf16 bits; };
template <> struct Storage<F16> {
  static __device__ __forceinline__ float load(F16 x) { return sapo_f16_to_f32(x.bits); }
  static __device__ __forceinline__ F16 store(float v) { F16 h; h.bits = sapo_f32_to_f16(v); return h; }
};
template <> struct Storage<BF16> {
  static __device__ __forceinline__ float load(BF16 x) { return sapo_bf16_to_f32(x.bits); }
  static __device__ __forceinline__ BF16 store(float v) { BF16 h; h.bits = sapo_f32_to_bf16(v); return h; }
};

template <typename T> __device__ __forceinline__ float sapo_load(const T* p, long i) {
  return Storage<T>::load(p[i]);
}

// ---- Deterministic reductions: every thread of the block gets the same bits. ----

template <typename T> __device__ __forceinline__ T sapo_warp_sum(T v) {
  for (int offset = SAPO_WARP / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
template <typename T> __device__ __forceinline__ T sapo_warp_min(T v) {
  for (int offset = SAPO_WARP / 2; offset > 0; offset >>= 1) {
    T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o < v ? o : v;
  }
  return v;
}
template <typename T> __device__ __forceinline__ T sapo_warp_max(T v) {
  for (int offset = SAPO_WARP / 2; offset > 0; offset >>= 1) {
    T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// Sums K values per thread over the block (blockDim.x a multiple of 32): a shuffle tree within
// each warp, then the warps' totals in warp order. `scratch` is shared memory of
// K·(SAPO_MAX_BLOCK/32) values. On return every thread's `v` holds the block totals.
template <int K, typename T>
__device__ __forceinline__ void sapo_block_sum(T (&v)[K], T* scratch) {
  const int lane = threadIdx.x % SAPO_WARP, warp = threadIdx.x / SAPO_WARP;
  const int warps = blockDim.x / SAPO_WARP;
  for (int k = 0; k < K; ++k) {
    T s = sapo_warp_sum(v[k]);
    if (lane == 0) scratch[k * (SAPO_MAX_BLOCK / SAPO_WARP) + warp] = s;
  }
  __syncthreads();
  for (int k = 0; k < K; ++k) {
    T s = 0;
    for (int w = 0; w < warps; ++w) s += scratch[k * (SAPO_MAX_BLOCK / SAPO_WARP) + w];
    v[k] = s;
  }
  __syncthreads();
}

// Minimum and maximum over the block, as `sapo_block_sum`; `scratch` holds 2·(SAPO_MAX_BLOCK/32).
template <typename T>
__device__ __forceinline__ void sapo_block_min_max(T& lo, T& hi, T* scratch) {
  const int lane = threadIdx.x % SAPO_WARP, warp = threadIdx.x / SAPO_WARP;
  const int warps = blockDim.x / SAPO_WARP;
  T l = sapo_warp_min(lo), h = sapo_warp_max(hi);
  if (lane == 0) {
    scratch[warp] = l;
    scratch[SAPO_MAX_BLOCK / SAPO_WARP + warp] = h;
  }
  __syncthreads();
  l = scratch[0];
  h = scratch[SAPO_MAX_BLOCK / SAPO_WARP];
  for (int w = 1; w < warps; ++w) {
    T a = scratch[w], b = scratch[SAPO_MAX_BLOCK / SAPO_WARP + w];
    l = a < l ? a : l;
    h = b > h ? b : h;
  }
  lo = l;
  hi = h;
  __syncthreads();
}
