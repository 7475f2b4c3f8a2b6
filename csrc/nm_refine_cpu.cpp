// nm_refine_cpu.cpp: the C++ CPU path of the N:M swap loop (SPEC §2, §3, §5), torch-free, and
// the C entry points of the CPU core (unstructured problems go to unstructured_refine_cpu.cpp).
//
// Rows are independent: std::threads take blocks of rows through an atomic counter. Per row,
// W is read once and everything else stays in per-thread row buffers (L1/L2 resident):
//   A. w = float32(W[r]) (exact; F16C for fp16 when the CPU has it), D = w * S, G = D / V^p
//      as simple loops the compiler vectorises
//   B. initial mask: ranks of the initial score inside each group of M (SSE2 for M = 4)
//   C. the pruned columns, compacted; e = sum of (double) D over them
//   D. grow queues: at most T = cycles pops ever happen, so only keys that can be among a
//      queue's T largest are kept (nm_common.h: both queues are "largest 64-bit key first"):
//      a float floor on G filters the pruned columns 8 at a time, survivors are appended and
//      trimmed by nth_element when the buffer fills. The floor starts from 3/4 of an earlier
//      row's T-th G; a row whose floor proves too high is collected again without it, so the
//      result never depends on the guess
//   E. the swap cycles pop each queue's <= 2T kept keys from a max-heap (lazily: a row rarely
//      uses all T); the partner search scans the M columns of the grown column's group.
// Never a full sort of a row. Memory traffic: W (2-4 bytes per weight) in, the mask (1 byte
// per weight) out; the [cols] vectors are shared by all rows and stay cached.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <new>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DSNOT_HAVE_F16C_PATH 1
#endif

#include "cpu_common.h"
#include "dsnot_nm.h"
#include "nm_common.h"

namespace dsnot {
namespace {

// Per-thread buffers, reused across rows.
struct Scratch {
  std::vector<float> w, d, g, score;   // [cols] float32 weights, D, G, initial score
  std::vector<float> gp;               // [cols + 8] G of the pruned columns, compacted
  std::vector<int32_t> pruned;         // [cols] the row's initially pruned columns
  std::vector<uint8_t> initial;        // [cols] the row's initial mask (partner rule)
  std::vector<uint64_t> grow[2];       // candidate keys of grow+ / grow- (>= 4 min(T, in) + 1 slots)
  std::vector<int32_t> order;          // one group's columns by initial score (runtime M)
  float guess[2] = {0.0f, 0.0f};       // G floors carried from the previous row (0 = none)

  void reserve(int64_t cols, int32_t cycles) {
    w.resize(cols);
    d.resize(cols);
    g.resize(cols);
    score.resize(cols);
    gp.resize(cols + 8);
    pruned.resize(cols);
    initial.resize(cols);
    // a queue never holds more than the row's columns: size by that, not by max_cycle_time
    const size_t depth = (size_t)std::min<int64_t>(cycles, cols);
    const size_t cap = std::max<size_t>(4 * depth, 256) + 1;
    grow[0].resize(cap);
    grow[1].resize(cap);
  }
};

template <int DT>
struct Row {
  const dsnot_nm_problem& p;
  int64_t base;  // r * cols

  float weight(int64_t j) const { return load_weight<DT>(p.weight, base + j); }
  float init_score(int64_t j, float wj) const {
    return p.init_score ? p.init_score[base + j] : mul_rn(fabs_f(wj), p.init_col_scale[j]);
  }
  float d_of(int64_t j, float wj) const { return mul_rn(wj, p.sum_metric_row[j]); }
  float a_of(int64_t j, float wj) const { return mul_rn(fabs_f(wj), p.sqrt_scaler_row[j]); }
};

// ---- A. fp16 -> float32 for a whole row -------------------------------------------------------
#if defined(DSNOT_HAVE_F16C_PATH)
// The F16C instruction converts 8 halves at once and exactly; the build keeps the x86-64
// baseline (no -march), so this one function is compiled for F16C and picked at run time.
__attribute__((target("avx,f16c"))) void halves_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = half_bits_to_float(src[j]);
}
const bool kHasF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#endif


// ---- B. initial mask ---------------------------------------------------------------------
// Column i of a group is pruned iff fewer than N columns come before it in (score, column)
// order: k before i  <=>  s_k < s_i, or s_k == s_i and k < i  (a stable ascending sort).
template <int M>
void mask_fixed_m(const float* sc, uint8_t* out, int64_t groups, int n) {
  for (int64_t b = 0; b < groups; ++b) {
    const float* sv = sc + b * M;
    for (int i = 0; i < M; ++i) {
      int rank = 0;
      for (int k = 0; k < M; ++k) rank += k < i ? (sv[k] <= sv[i]) : (sv[k] < sv[i]);
      out[b * M + i] = rank < n;
    }
  }
}

#if defined(__SSE2__)
// M = 4 (2:4, 1:4, 3:4) with one SSE register per group: lane i meets column (i + r) % 4 in
// rotation r; that column is lower than i exactly in the lanes i >= 4 - r.
template <>
void mask_fixed_m<4>(const float* sc, uint8_t* out, int64_t groups, int n) {
  const __m128i le1 = _mm_setr_epi32(0, 0, 0, -1), le2 = _mm_setr_epi32(0, 0, -1, -1),
                le3 = _mm_setr_epi32(0, -1, -1, -1), nv = _mm_set1_epi32(n), one = _mm_set1_epi8(1);
  auto before = [](__m128 other, __m128 self, __m128i lower) {  // all-ones where other goes first
    const __m128i le = _mm_castps_si128(_mm_cmple_ps(other, self));
    const __m128i lt = _mm_castps_si128(_mm_cmplt_ps(other, self));
    return _mm_or_si128(_mm_and_si128(lower, le), _mm_andnot_si128(lower, lt));
  };
  for (int64_t b = 0; b < groups; ++b) {
    const __m128 s = _mm_loadu_ps(sc + 4 * b);
    const __m128 s1 = _mm_shuffle_ps(s, s, _MM_SHUFFLE(0, 3, 2, 1));
    const __m128 s2 = _mm_shuffle_ps(s, s, _MM_SHUFFLE(1, 0, 3, 2));
    const __m128 s3 = _mm_shuffle_ps(s, s, _MM_SHUFFLE(2, 1, 0, 3));
    const __m128i minus_rank = _mm_add_epi32(_mm_add_epi32(before(s1, s, le1), before(s2, s, le2)),
                                             before(s3, s, le3));  // each "before" adds -1
    const __m128i pruned = _mm_cmplt_epi32(_mm_sub_epi32(_mm_setzero_si128(), minus_rank), nv);
    const __m128i bytes = _mm_and_si128(_mm_packs_epi16(_mm_packs_epi32(pruned, pruned), pruned), one);
    const int32_t four = _mm_cvtsi128_si32(bytes);
    std::memcpy(out + 4 * b, &four, 4);
  }
}
#endif

void mask_any_m(const float* sc, uint8_t* out, int64_t groups, int m, int n, std::vector<int32_t>& order) {
  order.resize(m);
  for (int64_t b = 0; b < groups; ++b) {
    const float* sv = sc + b * m;
    for (int i = 0; i < m; ++i) order[i] = i;
    std::sort(order.begin(), order.end(),
              [sv](int a, int c) { return score_before(sv[a], a, sv[c], c); });
    for (int i = 0; i < m; ++i) out[b * m + order[i]] = i < n;
  }
}

// ---- D. grow queues -----------------------------------------------------------------------
// Keeps the `depth` largest keys of buf[0, n) in buf[0, depth); returns the smallest of them.
uint64_t keep_largest(uint64_t* buf, size_t n, size_t depth) {
  std::nth_element(buf, buf + (depth - 1), buf + n, std::greater<uint64_t>());
  return buf[depth - 1];
}

// Collects into buf the keys of queue q (0: G > 0, 1: G < 0) that can be among its `depth`
// largest. gp[t] is G of the pruned column idx[t] (gp is padded with zeros to a multiple of 8:
// zero is in neither queue). floor_g: a starting floor on G (0 = none; for q = 1 "G <= it").
// Returns how many keys are in buf (<= cap); *members = the queue's size.
// Eight columns at a time, the member and floor tests make a bit mask without branches (the
// sign of G is a coin flip); only the survivors, few once the floor is good, are visited.
size_t collect(int q, const float* gp, const int32_t* idx, int64_t n_pruned, float floor_g,
               uint64_t* buf, size_t cap, size_t depth, int64_t* members) {
  const bool positive = q == 0;
  uint64_t floor_key = 0;  // every grow key is > 0 (its high word is >= 2^31)
  size_t n = 0;
  int64_t count = 0;
  for (int64_t t0 = 0; t0 < n_pruned; t0 += 8) {
    unsigned pass = 0;
    for (int i = 0; i < 8; ++i) {
      const float x = gp[t0 + i];
      const bool in_queue = positive ? x > 0 : x < 0;
      const bool above = positive ? x >= floor_g : x <= floor_g;
      count += in_queue;
      pass |= (unsigned)(in_queue & above) << i;
    }
    while (pass) {
      const int i = __builtin_ctz(pass);
      pass &= pass - 1;
      const uint64_t key = grow_key(gp[t0 + i], positive, (uint32_t)idx[t0 + i]);
      if (key <= floor_key) continue;
      buf[n++] = key;
      if (n == cap) {  // keep the best `depth`; the worst of them is the new floor
        floor_key = keep_largest(buf, n, depth);
        floor_g = grow_key_g(floor_key, positive);
        n = depth;
      }
    }
  }
  *members = count;
  return n;
}

// The queue's `depth` best keys, as a max-heap (popped lazily by the cycle loop).
size_t build_queue(int q, const float* gp, const int32_t* idx, int64_t n_pruned, Scratch& s,
                   size_t depth) {
  uint64_t* buf = s.grow[q].data();
  const size_t cap = s.grow[q].size() - 1;
  int64_t members = 0;
  size_t n = collect(q, gp, idx, n_pruned, s.guess[q], buf, cap, depth, &members);
  const bool redo = n < depth && (int64_t)n < members;
  if (redo)  // the guessed floor was too high: collect again without it
    n = collect(q, gp, idx, n_pruned, 0.0f, buf, cap, depth, &members);
  // The floor for the next row (rows of a layer have similar scales): 3/4 of this row's T-th
  // G. It is only re-measured when it let in more than 2T keys or had to be dropped; a floor
  // that proves too high costs one more collect pass, never a wrong result. The heap may hold
  // up to 2T keys: the cycle loop pops at most T of them, largest first.
  if (n > 2 * depth || (redo && n > depth)) {
    const uint64_t worst = keep_largest(buf, n, depth);
    n = depth;
    s.guess[q] = 0.75f * grow_key_g(worst, q == 0);
  } else if (n < depth) {
    s.guess[q] = 0.0f;  // the whole queue fit: measure again on the next row
  }
  std::make_heap(buf, buf + n);
  return n;
}

// ---- one row -------------------------------------------------------------------------------
template <int DT, int MT>
void refine_row(const dsnot_nm_problem& p, const dsnot_nm_output& o, int64_t r, Scratch& s) {
  const int64_t cols = p.cols;
  const int m = MT > 0 ? MT : p.prune_m;
  const int64_t groups = cols / m;
  const Row<DT> row{p, r * cols};
  uint8_t* out = o.pruned_mask + row.base;
  float* w = s.w.data();
  float* d = s.d.data();
  float* g = s.g.data();

  // A. weights, D, G
  if (DT == DSNOT_FLOAT16) {
    halves_to_floats(static_cast<const uint16_t*>(p.weight) + row.base, w, cols);
  } else {
    for (int64_t j = 0; j < cols; ++j) w[j] = row.weight(j);
  }
  const float* S = p.sum_metric_row;
  for (int64_t j = 0; j < cols; ++j) d[j] = mul_rn(w[j], S[j]);
  const bool queues = p.cycles > 0;
  if (queues) {
    const float* vp = p.var_pow;
    for (int64_t j = 0; j < cols; ++j) g[j] = div_rn(d[j], vp[j]);
  }

  // B. initial mask
  if (p.initial_mask) {
    std::memcpy(out, p.initial_mask + row.base, (size_t)cols);  // validated 0/1 bytes
  } else {
    const float* sc = p.init_score ? p.init_score + row.base : s.score.data();
    if (!p.init_score) {
      const float* ics = p.init_col_scale;
      for (int64_t j = 0; j < cols; ++j) s.score[j] = mul_rn(fabs_f(w[j]), ics[j]);
    }
    if (MT > 0) mask_fixed_m<(MT > 0 ? MT : 1)>(sc, out, groups, p.prune_n);
    else mask_any_m(sc, out, groups, m, p.prune_n, s.order);
  }

  // C. pruned columns (branch-free compaction) and e (four running float64 sums: they break
  // the add latency chain; the summation order is free, DESIGN rule 1)
  int32_t* idx = s.pruned.data();
  int64_t n_pruned = 0;
  for (int64_t j = 0; j < cols; ++j) {
    idx[n_pruned] = (int32_t)j;
    n_pruned += out[j] != 0;
  }
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t t = 0;
  for (; t + 4 <= n_pruned; t += 4)
    for (int k = 0; k < 4; ++k) part[k] += (double)d[idx[t + k]];
  for (; t < n_pruned; ++t) part[0] += (double)d[idx[t]];
  double e = (part[0] + part[1]) + (part[2] + part[3]);
  o.error_before[r] = (float)e;

  int32_t swaps = 0;
  if (queues) {
    // D. grow queues (heaps of their T best keys)
    const size_t depth = (size_t)std::min<int64_t>(p.cycles, cols);   // as Scratch::reserve
    size_t left[2];
    float* gp = s.gp.data();  // G of the pruned columns, contiguous, zero-padded to 8
    for (int64_t t2 = 0; t2 < n_pruned; ++t2) gp[t2] = g[idx[t2]];
    for (int64_t t2 = n_pruned; t2 < n_pruned + 8; ++t2) gp[t2] = 0.0f;
    left[0] = build_queue(0, gp, idx, n_pruned, s, depth);
    left[1] = build_queue(1, gp, idx, n_pruned, s, depth);
    std::memcpy(s.initial.data(), out, (size_t)cols);

    // E. the swap cycles (SPEC §5)
    const int sign0 = sign_of(e);
    for (int32_t cycle = 0; cycle < p.cycles; ++cycle) {
      if (!(fabs_d(e) > p.threshold)) break;
      const int q = e > 0 ? 0 : 1;  // grow+ when e > 0, else grow-
      if (left[q] == 0) break;
      uint64_t* heap = s.grow[q].data();
      std::pop_heap(heap, heap + left[q]);
      const int64_t gc = grow_key_col(heap[--left[q]], q == 0);
      // Partner: initially kept, not yet pruned by a swap, lowest initial score in the group.
      const int64_t j0 = gc - gc % m;
      int64_t partner = -1;
      float best = 0.0f;
      for (int64_t j = j0; j < j0 + m; ++j) {
        if (s.initial[j] || out[j]) continue;
        const float sj = row.init_score(j, w[j]);
        if (partner < 0 || score_before(sj, j, best, partner)) {
          partner = j;
          best = sj;
        }
      }
      if (partner < 0) continue;  // SPEC §5 [deviation]: no partner -> next cycle, no swap
      double e2;
      if (!propose_swap(p, e, sign0, d[partner], d[gc], row.a_of(partner, w[partner]), row.a_of(gc, w[gc]),
                        &e2))
        break;  // a rejected swap stops the row
      out[gc] = 0;
      out[partner] = 1;
      e = e2;
      ++swaps;
    }
  }
  o.swaps[r] = swaps;
  o.error_after[r] = (float)e;
}

using RowFn = void (*)(const dsnot_nm_problem&, const dsnot_nm_output&, int64_t, Scratch&);

template <int DT>
RowFn pick_m(int m) {
  switch (m) {
    case 4: return refine_row<DT, 4>;
    case 8: return refine_row<DT, 8>;
    case 16: return refine_row<DT, 16>;
    default: return refine_row<DT, 0>;
  }
}

RowFn pick(int dtype, int m) {
  switch (dtype) {
    case DSNOT_FLOAT32: return pick_m<DSNOT_FLOAT32>(m);
    case DSNOT_FLOAT16: return pick_m<DSNOT_FLOAT16>(m);
    default: return pick_m<DSNOT_BFLOAT16>(m);
  }
}

}  // namespace

void halves_to_floats(const uint16_t* src, float* dst, int64_t n) {
#if defined(DSNOT_HAVE_F16C_PATH)
  if (kHasF16c) return halves_f16c(src, dst, n);
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = half_bits_to_float_flat(src[j]);
}

}  // namespace dsnot

extern "C" int dsnot_nm_check(const dsnot_nm_problem* p, const dsnot_nm_output* o) {
  if (!p || !o) return DSNOT_BAD_ARGUMENT;
  if (p->dtype != DSNOT_FLOAT32 && p->dtype != DSNOT_FLOAT16 && p->dtype != DSNOT_BFLOAT16)
    return DSNOT_BAD_ARGUMENT;
  if (p->rows < 0 || p->cols < 0 || p->cols > 0x7FFFFFFF) return DSNOT_BAD_ARGUMENT;
  const bool unstructured = p->prune_m == 0 && p->prune_n == 0;
  if (unstructured) {
    if (p->pruned_per_row < 0 || p->pruned_per_row > p->cols) return DSNOT_BAD_ARGUMENT;
  } else {
    if (p->prune_m < 1 || p->prune_n < 1 || p->prune_n >= p->prune_m) return DSNOT_BAD_ARGUMENT;
    if (p->cols % p->prune_m != 0) return DSNOT_BAD_ARGUMENT;
  }
  if (p->cycles < 0 || !(p->threshold >= 0)) return DSNOT_BAD_ARGUMENT;
  if (p->rows == 0 || p->cols == 0) return DSNOT_OK;
  if (!p->weight || !p->sum_metric_row || !p->sqrt_scaler_row || !p->var_pow) return DSNOT_BAD_ARGUMENT;
  // The initial score builds the mask, and (N:M) orders the pruning partners.
  const bool needs_score = !unstructured || !p->initial_mask;
  if (needs_score && !p->init_col_scale && !p->init_score) return DSNOT_BAD_ARGUMENT;
  if (!o->pruned_mask || !o->swaps || !o->error_before || !o->error_after) return DSNOT_BAD_ARGUMENT;
  return DSNOT_OK;
}

extern "C" int dsnot_nm_refine_cpu(const dsnot_nm_problem* p, const dsnot_nm_output* o,
                                   int num_threads) {
  const int status = dsnot_nm_check(p, o);
  if (status != DSNOT_OK) return status;
  const int64_t rows = p->rows;
  if (rows == 0) return DSNOT_OK;
  if (p->cols == 0) {  // nothing to prune: e = 0 everywhere
    for (int64_t r = 0; r < rows; ++r) {
      o->swaps[r] = 0;
      o->error_before[r] = o->error_after[r] = 0.0f;
    }
    return DSNOT_OK;
  }
  if (p->prune_m == 0) return dsnot::refine_unstructured_cpu(*p, *o, num_threads);
  const dsnot::RowFn fn = dsnot::pick(p->dtype, p->prune_m);
  return dsnot::parallel_rows(
      rows, num_threads,
      [p]() {
        dsnot::Scratch scratch;
        scratch.reserve(p->cols, p->cycles);
        return scratch;
      },
      [p, o, fn](dsnot::Scratch& scratch, int64_t r) { fn(*p, *o, r, scratch); });
}

extern "C" const char* dsnot_status_string(int status) {
  switch (status) {
    case DSNOT_OK: return "ok";
    case DSNOT_BAD_ARGUMENT: return "bad argument (size, pointer, dtype, N:M pattern or pruned_per_row)";
    case DSNOT_NO_MEMORY: return "out of host memory";
    case DSNOT_CUDA_ERROR: return "CUDA kernel launch failed";
    case DSNOT_NO_CUDA: return "built without CUDA";
    case DSNOT_WORKSPACE: return "CUDA workspace too small";
    case DSNOT_UNSUPPORTED: return "this path does not implement the problem's pattern";
    default: return "unknown status";
  }
}

#ifndef DSNOT_WITH_CUDA
// Built without CUDA: the CUDA entry points exist so that the binding links, and say so.
extern "C" int dsnot_nm_has_cuda(void) { return 0; }
extern "C" int dsnot_nm_cuda_probe(void) { return -1; }
extern "C" const char* dsnot_nm_cuda_error_string(int) { return "no CUDA path"; }
extern "C" int dsnot_has_cuda_unstructured(void) { return 0; }
extern "C" size_t dsnot_nm_cuda_workspace_bytes(int64_t, int64_t, int32_t) { return 0; }
extern "C" int dsnot_nm_refine_cuda(const dsnot_nm_problem*, const dsnot_nm_output*, void*, size_t,
                                    cudaStream_t) {
  return DSNOT_NO_CUDA;
}
#endif
