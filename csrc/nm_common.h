// nm_common.h: scalar helpers shared by the CPU (.cpp) and CUDA (.cu) cores, so both paths
// evaluate every score with literally the same expression.
//
// Exactness rules (SPEC §3, DESIGN "Correctness rules"):
// - weights are upcast to float32 by exact bit manipulation (fp16 subnormals included);
// - each float32 product / quotient is one IEEE round-to-nearest operation: on the device we
//   spell them __fmul_rn / __fdiv_rn (never contracted into an FMA, whatever -fmad says); on
//   the host the build uses -ffp-contract=off and no -ffast-math (CMakeLists.txt);
// - the float64 acceptance expressions follow dsnot_kernels/problem.py term by term.
#ifndef DSNOT_NM_COMMON_H_
#define DSNOT_NM_COMMON_H_

#include <stdint.h>
#include <string.h>

#include "dsnot_nm.h"

#if defined(__CUDACC__)
#define DSNOT_HD __host__ __device__ __forceinline__
#else
#define DSNOT_HD inline
#endif

namespace dsnot {

DSNOT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

DSNOT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// IEEE binary16 -> float32, exact for every input (normal, subnormal, inf, NaN).
DSNOT_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24, both factors exact in float32 so the product is exact
  const float mag = (float)mant * 5.9604644775390625e-8f;
  return bits_to_float(sign | float_to_bits(mag));
}

// The same conversion without branches, so that a loop over a row vectorises on the host
// (test_nm_core checks it against half_bits_to_float on all 65536 inputs).
DSNOT_HD float half_bits_to_float_flat(uint16_t h) {
  const uint32_t body = (uint32_t)(h & 0x7FFFu) << 13;
  const uint32_t e5 = h & 0x7C00u;
  const uint32_t normal = body + (112u << 23);  // rebias the exponent
  const uint32_t special = body | 0x7F800000u;  // inf / NaN
  const uint32_t sub = float_to_bits((float)(h & 0x3FFu) * 5.9604644775390625e-8f);  // m * 2^-24
  const uint32_t mag = e5 == 0x7C00u ? special : (e5 == 0 ? sub : normal);
  return bits_to_float(mag | ((uint32_t)(h & 0x8000u) << 16));
}

// bfloat16 is the top half of a float32: exact.
DSNOT_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

// The weight at flat index i of a [rows, cols] tensor in dtype DT, as float32.
template <int DT>
DSNOT_HD float load_weight(const void* w, int64_t i) {
  if (DT == DSNOT_FLOAT32) return static_cast<const float*>(w)[i];
  if (DT == DSNOT_FLOAT16) return half_bits_to_float(static_cast<const uint16_t*>(w)[i]);
  return bf16_bits_to_float(static_cast<const uint16_t*>(w)[i]);
}

DSNOT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DSNOT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

DSNOT_HD double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

DSNOT_HD double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

DSNOT_HD double dsub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

DSNOT_HD float fabs_f(float x) { return bits_to_float(float_to_bits(x) & 0x7FFFFFFFu); }
DSNOT_HD double fabs_d(double x) { return x < 0 ? -x : x; }  // e is never NaN
DSNOT_HD int sign_of(double x) { return (x > 0) - (x < 0); }  // torch.sign (0 for 0)

// "a is pruned before b" for initial scores: ascending score, ties lower column (a stable
// ascending sort). Plain float comparison, like torch.sort (-0.0 == +0.0).
DSNOT_HD bool score_before(float sa, int64_t ca, float sb, int64_t cb) {
  return sa < sb || (sa == sb && ca < cb);
}

// Order-preserving image of a non-NaN float32 in uint32 (larger float -> larger integer).
DSNOT_HD uint32_t ordered_bits(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The two grow queues as ONE rule, "take the largest 64-bit key first":
//   grow+ (G > 0):  key = ordered(G) << 32 | col          G descending, ties higher column first
//   grow- (G < 0):  key = ~ordered(G) << 32 | ~col        G ascending,  ties lower column first
// Keys are distinct (distinct columns), so any selection / sort on them is deterministic.
DSNOT_HD uint32_t grow_key_hi(float g, bool positive) {
  return positive ? ordered_bits(g) : ~ordered_bits(g);
}
DSNOT_HD uint64_t grow_key(float g, bool positive, uint32_t col) {
  return ((uint64_t)grow_key_hi(g, positive) << 32) | (positive ? col : ~col);
}
// The G a key was made from (inverse of grow_key_hi + ordered_bits).
DSNOT_HD float grow_key_g(uint64_t key, bool positive) {
  const uint32_t hi = (uint32_t)(key >> 32);
  const uint32_t ord = positive ? hi : ~hi;
  return bits_to_float((ord & 0x80000000u) ? (ord ^ 0x80000000u) : ~ord);
}
DSNOT_HD uint32_t grow_key_col(uint64_t key, bool positive) {
  const uint32_t lo = (uint32_t)(key & 0xFFFFFFFFu);
  return positive ? lo : ~lo;
}

// dsnot_kernels.problem.moment_delta, same float64 operations in the same order:
//   L*(A_p^2 - A_g^2) - (D_p^2 - D_g^2) + (e2^2 - e^2)
DSNOT_HD double moment_delta(double e, double e2, float d_p, float d_g, float a_p, float a_g,
                             double seq_len) {
  const double ap = a_p, ag = a_g, dp = d_p, dg = d_g;
  const double t_a = dmul(seq_len, dsub(dmul(ap, ap), dmul(ag, ag)));
  const double t_d = dsub(dmul(dp, dp), dmul(dg, dg));
  const double t_e = dsub(dmul(e2, e2), dmul(e, e));
  return dadd(dsub(t_a, t_d), t_e);
}

// One proposed swap of SPEC §4/§5 (prune p, regrow g): the row error after it,
// e2 = (e + D_p) - D_g in float64 rounded like the reference, and whether the acceptance tests
// of dsnot_kernels.problem.swap_accepted pass (a rejection stops the row).
DSNOT_HD bool propose_swap(const dsnot_nm_problem& p, double e, int sign0, float d_p, float d_g,
                           float a_p, float a_g, double* e2_out) {
  const double e2 = dsub(dadd(e, (double)d_p), (double)d_g);
  *e2_out = e2;
  if (p.sign_check && sign_of(e2) != sign0) return false;
  if (p.improve_check && !(fabs_d(e2) < fabs_d(e))) return false;
  if (p.moment_check && !(moment_delta(e, e2, d_p, d_g, a_p, a_g, p.seq_len) < 0)) return false;
  return true;
}

}  // namespace dsnot

#endif  // DSNOT_NM_COMMON_H_
