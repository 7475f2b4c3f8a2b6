// unstructured_refine_cpu.cpp: the C++ CPU path of unstructured DSnoT (SPEC §2-§4), torch-free.
//
// Rows are independent (cpu_common.h: std::threads take blocks of rows). Per row, W is read
// once and everything else lives in per-thread buffers (no allocation per row):
//   A. w = float32(W[r]) (exact; F16C for fp16), D = w * S                 vectorised loops
//   B. initial mask = the k lowest (s0, column) keys: an MSB radix select. s0's order-
//      preserving 32-bit image is histogrammed on its top 12 bits, the bin holding the k-th
//      key is found by a prefix walk, only that bin's few keys (64-bit: key32 << 32 | column,
//      so ties go to the lower column) go through nth_element, and one compare per column
//      writes the mask. Linear time, no sort.
//   C. e = sum over the pruned columns of (double) D (eight running sums; the order is free,
//      DESIGN rule 1)
//   D. the four queues as "largest 64-bit key first" (nm_common.h):
//        grow+  pruned, G > 0:  ordered(G) << 32 | col       G desc, ties higher column first
//        grow-  pruned, G < 0: ~ordered(G) << 32 | ~col      G asc,  ties lower column first
//        prune- kept,   D < 0: ~ordered(A) << 32 | ~col      A asc,  ties lower column first
//        prune+ kept,   D > 0: ~ordered(A) << 32 | ~col
//      At most T = cycles pops ever happen per queue, so a queue is never sorted: a float
//      floor (carried from the previous row, re-checked) filters the columns, and the
//      survivors' T largest keys are taken by nth_element and then sorted (T log T).
//   E. the cycle loop of SPEC §4 over the four short sorted lists.
// Memory traffic: W (2-4 bytes per weight) in, the mask (1 byte per weight) out; the [cols]
// vectors are shared by all rows and stay cached.
#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "cpu_common.h"
#include "dsnot_nm.h"
#include "nm_common.h"

namespace dsnot {
namespace {

constexpr int kHistBits = 12;  // radix digit of the initial selection: 4096 bins (16 KB)
constexpr int kQueues = 4;     // 0 grow+, 1 grow-, 2 prune-, 3 prune+
constexpr uint8_t kNone = 4;   // a column in no queue (G = 0 pruned, D = 0 kept)

struct UScratch {
  std::vector<float> w, d, dm;      // [cols] float32 weights, D, D of the pruned (else 0)
  std::vector<uint32_t> key;        // [cols] ordered image of the initial score
  std::vector<uint32_t> hist;       // [1 << kHistBits]
  std::vector<uint64_t> sel;        // [cols] keys of the k-th key's bin
  std::vector<uint8_t> qid;         // [cols] the column's queue (kNone: none)
  std::vector<uint64_t> q[kQueues]; // [cols] queue candidates (largest key first after D)
  size_t n[kQueues] = {0, 0, 0, 0}; // candidates in q[]
  size_t members[kQueues] = {0, 0, 0, 0};
  uint32_t floor[kQueues] = {0, 0, 0, 0};  // priority floors guessed from the previous row

  void reserve(int64_t cols) {
    w.resize(cols);
    d.resize(cols);
    dm.resize(cols);
    key.resize(cols);
    hist.resize((size_t)1 << kHistBits);
    sel.resize(cols);
    qid.resize(cols);
    for (auto& v : q) v.resize(cols);
  }
};

// -0.0 -> +0.0 (torch.sort treats them as equal, so they must get the same key); the
// addition is not removed by the compiler (no -ffast-math).
inline float canon_zero(float x) { return x + 0.0f; }

// B. The k lowest (score, column) keys of the row, 0 < k < cols: writes out[j] = 1 for them.
void lowest_k(const uint32_t* key, int64_t cols, int64_t k, UScratch& s, uint8_t* out) {
  uint32_t* hist = s.hist.data();
  std::memset(hist, 0, sizeof(uint32_t) << kHistBits);
  for (int64_t j = 0; j < cols; ++j) ++hist[key[j] >> (32 - kHistBits)];
  int64_t below = 0;  // keys in lower bins
  uint32_t bin = 0;
  while (below + hist[bin] < k) below += hist[bin++];
  // the (k - below)-th smallest key of `bin` is the k-th smallest of the row
  uint64_t* sel = s.sel.data();
  int64_t n = 0;
  for (int64_t j = 0; j < cols; ++j) {
    sel[n] = ((uint64_t)key[j] << 32) | (uint64_t)j;
    n += (key[j] >> (32 - kHistBits)) == bin;
  }
  const int64_t need = k - below;  // 1 <= need <= n
  std::nth_element(sel, sel + (need - 1), sel + n);
  const uint64_t kth = sel[need - 1];
  const uint32_t kth_hi = (uint32_t)(kth >> 32), kth_col = (uint32_t)kth;
  for (int64_t j = 0; j < cols; ++j)  // (key, j) <= (kth_hi, kth_col), branch-free
    out[j] = (key[j] < kth_hi) | ((key[j] == kth_hi) & ((uint32_t)j <= kth_col));
}

// D. Sorts the `depth` largest of buf[0, n) into buf[0, depth) (largest first); returns depth.
size_t top_sorted(uint64_t* buf, size_t n, size_t depth) {
  if (depth < n) std::nth_element(buf, buf + (depth - 1), buf + n, std::greater<uint64_t>());
  else depth = n;
  std::sort(buf, buf + depth, std::greater<uint64_t>());
  return depth;
}

// Inverse of ordered_bits.
inline float from_ordered(uint32_t o) { return bits_to_float((o & 0x80000000u) ? (o ^ 0x80000000u) : ~o); }

// A priority floor of queue q one third looser (in value) than priority `hi`.
uint32_t loosen(int q, uint32_t hi) {
  if (q == 0) return ordered_bits(0.75f * from_ordered(hi));     // G >= 0.75 G_T
  if (q == 1) return ~ordered_bits(0.75f * from_ordered(~hi));   // G <= 0.75 G_T (G < 0)
  return ~ordered_bits(canon_zero(from_ordered(~hi) * (4.0f / 3.0f)));  // A <= 4/3 A_T
}

// Fills s.q[q][0, s.n[q]) with the 64-bit keys of queue q that can be among its T largest:
// priority hi >= s.floor[q] (64-bit key = hi << 32 | col, or | ~col where lower columns go
// first). Eight columns at a time the floor test makes a bit mask without branches; only the
// survivors, few once the floor is good, are visited. A buffer that fills is trimmed to its T
// best by nth_element, whose worst key becomes the floor. A queue whose guessed floor let
// fewer than T of its members through is collected again without a floor.
void collect_queues(const uint32_t* hi, const uint8_t* qid, int64_t cols, size_t T, UScratch& s) {
  size_t cnt[kQueues + 1] = {0, 0, 0, 0, 0};
  for (int64_t j = 0; j < cols; ++j) {  // member counts, vectorised
    cnt[0] += qid[j] == 0;
    cnt[1] += qid[j] == 1;
    cnt[2] += qid[j] == 2;
    cnt[3] += qid[j] == 3;
  }
  const size_t cap = std::min<size_t>((size_t)cols, std::max<size_t>(4 * T, 256));
  for (int qi = 0; qi < kQueues; ++qi) s.members[qi] = cnt[qi];
  auto run = [&](const uint32_t floor_in[kQueues], int only) {
    uint32_t fl[kQueues + 1] = {floor_in[0], floor_in[1], floor_in[2], floor_in[3], 0xFFFFFFFFu};
    uint64_t floor_key[kQueues] = {0, 0, 0, 0};
    for (int qi = 0; qi < kQueues; ++qi) {
      if (only >= 0 && qi != only) fl[qi] = 0xFFFFFFFFu;  // never reached by a priority
      else s.n[qi] = 0;
    }
    for (int64_t j0 = 0; j0 < cols; j0 += 8) {
      const int width = (int)std::min<int64_t>(8, cols - j0);
      unsigned pass = 0;
      for (int i = 0; i < width; ++i) pass |= (unsigned)(hi[j0 + i] >= fl[qid[j0 + i]]) << i;
      while (pass) {
        const int64_t j = j0 + __builtin_ctz(pass);
        pass &= pass - 1;
        const int qi = qid[j];
        const uint64_t key = ((uint64_t)hi[j] << 32) | (qi == 0 ? (uint32_t)j : ~(uint32_t)j);
        if (key <= floor_key[qi]) continue;
        uint64_t* buf = s.q[qi].data();
        buf[s.n[qi]++] = key;
        if (s.n[qi] == cap && cap > T) {  // keep the best T; the worst of them is the floor
          std::nth_element(buf, buf + (T - 1), buf + cap, std::greater<uint64_t>());
          floor_key[qi] = buf[T - 1];
          fl[qi] = (uint32_t)(floor_key[qi] >> 32);
          s.n[qi] = T;
        }
      }
    }
  };
  run(s.floor, -1);
  const uint32_t none[kQueues] = {0, 0, 0, 0};
  for (int qi = 0; qi < kQueues; ++qi)
    if (s.n[qi] < T && s.n[qi] < s.members[qi]) run(none, qi);  // the guess was too high
}

template <int DT>
void refine_row(const dsnot_nm_problem& p, const dsnot_nm_output& o, int64_t r, UScratch& s) {
  const int64_t cols = p.cols;
  const int64_t base = r * cols;
  uint8_t* out = o.pruned_mask + base;
  float* w = s.w.data();
  float* d = s.d.data();

  // A. weights and D
  if (DT == DSNOT_FLOAT16) {
    halves_to_floats(static_cast<const uint16_t*>(p.weight) + base, w, cols);
  } else {
    for (int64_t j = 0; j < cols; ++j) w[j] = load_weight<DT>(p.weight, base + j);
  }
  const float* S = p.sum_metric_row;
  for (int64_t j = 0; j < cols; ++j) d[j] = mul_rn(w[j], S[j]);

  // B. initial mask
  const int64_t k = p.pruned_per_row;
  if (p.initial_mask) {
    std::memcpy(out, p.initial_mask + base, (size_t)cols);  // validated 0/1 bytes
  } else if (k == 0 || k == cols) {
    std::memset(out, k == cols ? 1 : 0, (size_t)cols);
  } else {
    uint32_t* key = s.key.data();
    if (p.init_score) {
      const float* sc = p.init_score + base;
      for (int64_t j = 0; j < cols; ++j) key[j] = ordered_bits(canon_zero(sc[j]));
    } else {
      const float* ics = p.init_col_scale;
      for (int64_t j = 0; j < cols; ++j) key[j] = ordered_bits(canon_zero(mul_rn(fabs_f(w[j]), ics[j])));
    }
    lowest_k(key, cols, k, s, out);
  }

  // C. e: the pruned D, selected without branches (the mask is a coin flip per column), are
  // summed in float64 in eight independent lanes
  float* dm = s.dm.data();
  for (int64_t j = 0; j < cols; ++j)  // bit-and with 0 / all-ones: vectorises, never branches
    dm[j] = bits_to_float(float_to_bits(d[j]) & (0u - (uint32_t)out[j]));
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j8 = 0;
  for (; j8 + 8 <= cols; j8 += 8)
    for (int t = 0; t < 8; ++t) part[t] += (double)dm[j8 + t];
  for (; j8 < cols; ++j8) part[0] += (double)dm[j8];
  for (int t = 0; t < 4; ++t) part[t] += part[t + 4];
  double e = (part[0] + part[1]) + (part[2] + part[3]);
  o.error_before[r] = (float)e;

  int32_t swaps = 0;
  if (p.cycles > 0) {
    // D. the four queues: per column its queue and 32-bit priority (vectorised), then a
    // floor filter and the T best 64-bit keys of each queue, sorted
    const float* vp = p.var_pow;
    const float* sq = p.sqrt_scaler_row;
    uint32_t* hi = s.key.data();  // the initial keys are no longer needed
    uint8_t* qid = s.qid.data();
    for (int64_t j = 0; j < cols; ++j) {
      const float g = div_rn(d[j], vp[j]);
      const uint32_t og = ordered_bits(g);
      const uint32_t oa = ordered_bits(canon_zero(mul_rn(fabs_f(w[j]), sq[j])));
      const uint8_t q_pruned = g > 0 ? 0 : (g < 0 ? 1 : kNone);
      const uint8_t q_kept = d[j] < 0 ? 2 : (d[j] > 0 ? 3 : kNone);
      qid[j] = out[j] ? q_pruned : q_kept;
      hi[j] = out[j] ? (g > 0 ? og : ~og) : ~oa;
    }
    const size_t T = (size_t)p.cycles;
    size_t left[kQueues], head[kQueues] = {0, 0, 0, 0};
    collect_queues(hi, qid, cols, T, s);
    for (int qi = 0; qi < kQueues; ++qi) {
      left[qi] = top_sorted(s.q[qi].data(), s.n[qi], T);
      // Next row's floor (rows of a layer have similar scales): this row's T-th priority,
      // loosened by 4/3 in value. A floor that proves too high costs one more scan, never
      // a wrong result (collect_queues).
      s.floor[qi] = left[qi] == T && s.members[qi] > T ? loosen(qi, (uint32_t)(s.q[qi][T - 1] >> 32)) : 0u;
    }

    // E. the swap cycles (SPEC §4)
    const int sign0 = sign_of(e);
    for (int32_t cycle = 0; cycle < p.cycles; ++cycle) {
      if (!(fabs_d(e) > p.threshold)) break;
      const bool pos = e > 0;
      const int qg = pos ? 0 : 1, qp = pos ? 2 : 3;  // grow+ / prune- when e > 0
      if (head[qg] == left[qg] || head[qp] == left[qp]) break;  // an empty queue stops the row
      const int64_t gc = grow_key_col(s.q[qg][head[qg]++], qg == 0);
      const int64_t pc = grow_key_col(s.q[qp][head[qp]++], false);
      const float a_p = mul_rn(fabs_f(w[pc]), sq[pc]), a_g = mul_rn(fabs_f(w[gc]), sq[gc]);
      double e2;
      if (!propose_swap(p, e, sign0, d[pc], d[gc], a_p, a_g, &e2)) break;  // a rejection stops the row
      out[gc] = 0;
      out[pc] = 1;
      e = e2;
      ++swaps;
    }
  }
  o.swaps[r] = swaps;
  o.error_after[r] = (float)e;
}

using RowFn = void (*)(const dsnot_nm_problem&, const dsnot_nm_output&, int64_t, UScratch&);

}  // namespace

int refine_unstructured_cpu(const dsnot_nm_problem& p, const dsnot_nm_output& o, int num_threads) {
  RowFn fn = p.dtype == DSNOT_FLOAT32   ? refine_row<DSNOT_FLOAT32>
             : p.dtype == DSNOT_FLOAT16 ? refine_row<DSNOT_FLOAT16>
                                        : refine_row<DSNOT_BFLOAT16>;
  const int64_t cols = p.cols;
  return parallel_rows(
      p.rows, num_threads,
      [cols]() {
        UScratch s;
        s.reserve(cols);
        return s;
      },
      [&p, &o, fn](UScratch& s, int64_t r) { fn(p, o, r, s); });
}

}  // namespace dsnot
