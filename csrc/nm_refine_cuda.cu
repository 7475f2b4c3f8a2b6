// nm_refine_cuda.cu: the CUDA path of the N:M swap loop (SPEC §2, §3, §5). Torch-free: raw
// pointers, sizes, a cudaStream_t and a status code (dsnot_nm.h). Same results as the CPU
// path (nm_refine_cpu.cpp) and the reference, bit for bit on tie-free inputs.
//
// Why one WARP per row (not one thread, not one block):
// - one thread per row reads each row sequentially, so the 32 threads of a warp touch 32
//   different rows per load (uncoalesced), and a 4096-row layer makes only 128 warps: the GPU
//   would sit mostly idle;
// - a warp reads its row in coalesced chunks (lane L owns the groups L, L+32, ...: for 2:4
//   fp16 that is 8 contiguous bytes per lane, 256 contiguous bytes per warp instruction), a
//   4096-row layer gives 4096 warps (enough to fill an H100), and every cross-lane step
//   (sums, histograms, arg-min) is a few shuffles with no block barrier;
// - a block per row would need __syncthreads between the phases for little gain: a row is
//   only a few KB, and the serial swap loop (<= T dependent steps) would idle all but a warp.
//
// Per row (warp) the kernel does:
//   1. one pass: initial N:M mask -> pruned_mask, e (float64, warp sum), and per grow queue the
//      member count and min/max of the 32-bit key (nm_common.h: both queues are "largest
//      64-bit key first");
//   2. top-T selection per queue without sorting the row: an MSB-first radix select on the
//      32-bit key (8-bit digits starting at the highest bit where the queue's keys differ,
//      shared-memory histograms, usually 2-3 passes, stopping as soon as the digit's bin holds
//      exactly the keys still needed); equal 32-bit keys (ties in G) are resolved by column
//      order with a warp prefix scan, as the stable sorts of the reference do;
//   3. one pass collects the <= T selected 64-bit keys into the workspace, and a rank sort
//      (O(T^2 / 32) per lane) orders them;
//   4. the swap loop, warp-uniform: every lane holds the same e and takes the same decisions;
//      the partner search spreads the group's M columns over the lanes (arg-min by shuffles).
// Memory traffic: W read once from HBM (later passes hit L1/L2: a row is a few KB), one byte
// per weight of mask written, 12 * 2 * T bytes of workspace per row.
//
// Exactness: float32 products/quotients are __fmul_rn/__fdiv_rn (nm_common.h) and the build
// adds -fmad=false, so nothing is contracted into an FMA; float64 sums use __dadd_rn.
#include <cuda_runtime.h>

#include "dsnot_nm.h"
#include "nm_common.h"

namespace dsnot {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;        // 128 threads: small blocks keep tail waste low
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kBins = 256;               // 8-bit radix digits

// Selection state of one grow queue.
enum SelectMode : int {
  kAll = 0,      // every member is selected (members <= T)
  kAtLeast = 1,  // members with key_hi >= kth are exactly the T selected
  kTie = 2,      // key_hi > kth, plus `need` of the members with key_hi == kth (column order)
  kRefine = 3,   // radix select in progress
};

struct Queue {
  int mode;
  uint32_t prefix;    // resolved high bits of the T-th key
  uint32_t pmask;     // which bits of prefix are resolved
  int top;            // highest unresolved bit
  uint32_t need;      // selected keys still to find among those matching prefix
  uint32_t tie_total; // members with key_hi == kth (kTie)
  uint32_t depth;     // min(T, members): how many are selected
};

template <int MT>
struct RowView {
  const dsnot_nm_problem& p;
  uint8_t* out;        // this row's mask
  int64_t base;        // row * cols
  int m;

  // The dtype is a warp-uniform runtime switch rather than a template parameter: the branch
  // costs next to nothing beside the load, and it keeps the kernel count (compile time) low.
  // fp16 -> fp32 is the hardware conversion (exact, like half_bits_to_float on the host).
  __device__ float weight(int64_t j) const {
    if (p.dtype == DSNOT_FLOAT32) return static_cast<const float*>(p.weight)[base + j];
    const unsigned short h = static_cast<const unsigned short*>(p.weight)[base + j];
    if (p.dtype == DSNOT_BFLOAT16) return __uint_as_float((unsigned)h << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  __device__ float init_score(int64_t j, float wj) const {
    return p.init_score ? p.init_score[base + j] : mul_rn(fabs_f(wj), p.init_col_scale[j]);
  }
  // Rank of column j0+i among the group's initial scores (0 = pruned first).
  __device__ int group_rank(int64_t j0, int i, float si) const {
    int rank = 0;
    for (int k = 0; k < m; ++k) {
      if (k == i) continue;
      const float sk = init_score(j0 + k, weight(j0 + k));
      rank += score_before(sk, k, si, i) ? 1 : 0;
    }
    return rank;
  }
  __device__ bool initially_pruned(int64_t j0, int i, float si) const {
    return p.initial_mask ? p.initial_mask[base + j0 + i] != 0 : group_rank(j0, i, si) < p.prune_n;
  }

  // Calls f(j, positive, g, key_hi) for every pruned column of group b with G != 0, in column
  // order. Reads the mask this lane wrote in phase 1 (same lane <-> group map in every pass).
  template <class F>
  __device__ void for_each_candidate(int64_t b, F&& f) const {
    const int64_t j0 = b * m;
    // Partly unrolled only: three passes instantiate this, and full unrolling for M = 16
    // multiplies compile time for no measurable gain (these passes hit L1/L2).
#pragma unroll 4
    for (int i = 0; i < m; ++i) visit(j0 + i, f);
  }
  template <class F>
  __device__ void visit(int64_t j, F& f) const {
    if (!out[j]) return;
    const float d = mul_rn(weight(j), p.sum_metric_row[j]);
    const float g = div_rn(d, p.var_pow[j]);
    if (g > 0) f(j, true, g, grow_key_hi(g, true));
    else if (g < 0) f(j, false, g, grow_key_hi(g, false));
  }
};

// Phase 1 for group b: initial mask, e, and per-queue count / key range.
template <int MT>
__device__ void initial_group(const RowView<MT>& row, int64_t b, double& e, uint32_t cnt[2],
                              uint32_t kmin[2], uint32_t kmax[2]) {
  const dsnot_nm_problem& p = row.p;
  const int64_t j0 = b * row.m;
  auto take = [&](int64_t j, float wj) {
    const float d = mul_rn(wj, p.sum_metric_row[j]);
    e = dadd(e, (double)d);
    const float g = div_rn(d, p.var_pow[j]);
    if (g != 0 && g == g) {
      const int q = g > 0 ? 0 : 1;
      const uint32_t k = grow_key_hi(g, q == 0);
      cnt[q] += 1;
      kmin[q] = min(kmin[q], k);
      kmax[q] = max(kmax[q], k);
    }
  };
  if (MT > 0) {
    constexpr int M = MT > 0 ? MT : 1;
    float wv[M], sv[M];
    bool pruned[M];
#pragma unroll
    for (int i = 0; i < M; ++i) wv[i] = row.weight(j0 + i);
    if (p.initial_mask) {
#pragma unroll
      for (int i = 0; i < M; ++i) pruned[i] = p.initial_mask[row.base + j0 + i] != 0;
    } else {
#pragma unroll
      for (int i = 0; i < M; ++i) sv[i] = row.init_score(j0 + i, wv[i]);
#pragma unroll
      for (int i = 0; i < M; ++i) {
        int rank = 0;
#pragma unroll
        for (int k = 0; k < M; ++k) rank += score_before(sv[k], k, sv[i], i) ? 1 : 0;
        pruned[i] = rank < p.prune_n;
      }
    }
#pragma unroll
    for (int i = 0; i < M; ++i) {
      row.out[j0 + i] = pruned[i] ? 1 : 0;
      if (pruned[i]) take(j0 + i, wv[i]);
    }
  } else {
    for (int i = 0; i < row.m; ++i) {
      const float wi = row.weight(j0 + i);
      const bool pr = row.initially_pruned(j0, i, row.init_score(j0 + i, wi));
      row.out[j0 + i] = pr ? 1 : 0;
      if (pr) take(j0 + i, wi);
    }
  }
}

__device__ __forceinline__ uint32_t high_mask(int top) {  // bits above `top`
  return top >= 31 ? 0u : (0xFFFFFFFFu << (top + 1));
}

// In a 256-bin histogram (largest bin = largest keys), the bin holding the need-th largest
// key: returns bin, the count in higher bins (above) and the bin's count. Warp-cooperative.
__device__ void find_bin(const uint32_t* hist, uint32_t need, int lane, uint32_t& bin,
                         uint32_t& above, uint32_t& count) {
  uint32_t c[8];
  uint32_t mine = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    c[k] = hist[lane * 8 + k];
    mine += c[k];
  }
  uint32_t suffix = mine;  // keys in lanes >= this one (higher bins live in higher lanes)
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const uint32_t t = __shfl_down_sync(kFull, suffix, off);
    if (lane + off < kWarp) suffix += t;
  }
  // suffix is non-increasing in lane; the holder is the highest lane with suffix >= need.
  const unsigned ballot = __ballot_sync(kFull, suffix >= need);
  const int holder = 31 - __clz((int)ballot);
  uint32_t r_bin = 0, r_above = 0, r_count = 0;
  if (lane == holder) {
    uint32_t a = suffix - mine;
    bool found = false;
#pragma unroll
    for (int k = 7; k >= 0; --k) {
      if (!found && a + c[k] >= need) {
        found = true;
        r_bin = (uint32_t)(lane * 8 + k);
        r_above = a;
        r_count = c[k];
      }
      if (!found) a += c[k];
    }
  }
  bin = __shfl_sync(kFull, r_bin, holder);
  above = __shfl_sync(kFull, r_above, holder);
  count = __shfl_sync(kFull, r_count, holder);
}

template <int MT>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
nm_refine_kernel(const dsnot_nm_problem p, const dsnot_nm_output o, uint64_t* ws_keys,
                 int32_t* ws_cols, int64_t depth_stride) {
  __shared__ uint32_t hist_all[kWarpsPerBlock][2 * kBins];
  __shared__ uint32_t taken_all[kWarpsPerBlock][2];
  const int lane = threadIdx.x & (kWarp - 1);
  const int warp = threadIdx.x / kWarp;
  const int64_t r = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
  if (r >= p.rows) return;  // whole warps leave together
  uint32_t* hist = hist_all[warp];
  uint32_t* taken = taken_all[warp];

  const int m = MT > 0 ? MT : p.prune_m;
  const int64_t groups = p.cols / m;
  const RowView<MT> row{p, o.pruned_mask + r * p.cols, r * p.cols, m};

  // ---- 1. initial mask, e, queue sizes and key ranges -----------------------------------
  double e = 0.0;
  uint32_t cnt[2] = {0, 0}, kmin[2] = {0xFFFFFFFFu, 0xFFFFFFFFu}, kmax[2] = {0, 0};
  for (int64_t b = lane; b < groups; b += kWarp) initial_group(row, b, e, cnt, kmin, kmax);
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) e = dadd(e, __shfl_xor_sync(kFull, e, off));
  e = __shfl_sync(kFull, e, 0);  // identical in every lane anyway; make it explicit
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    cnt[q] = __reduce_add_sync(kFull, cnt[q]);
    kmin[q] = __reduce_min_sync(kFull, kmin[q]);
    kmax[q] = __reduce_max_sync(kFull, kmax[q]);
  }
  if (lane == 0) o.error_before[r] = (float)e;
  if (p.cycles == 0) {
    if (lane == 0) {
      o.swaps[r] = 0;
      o.error_after[r] = (float)e;
    }
    return;
  }
  const uint32_t T = (uint32_t)p.cycles;

  // ---- 2. radix select of the T largest keys per queue ----------------------------------
  Queue qs[2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    Queue& s = qs[q];
    s.depth = min(T, cnt[q]);
    s.need = T;
    s.prefix = s.pmask = s.tie_total = 0;
    s.top = -1;
    if (cnt[q] <= T) {
      s.mode = kAll;
    } else if (kmin[q] == kmax[q]) {  // every key_hi equal: pure column order
      s.mode = kTie;
      s.prefix = kmin[q];
      s.tie_total = cnt[q];
    } else {
      s.mode = kRefine;
      s.top = 31 - __clz((int)(kmin[q] ^ kmax[q]));  // bits above it are common to all keys
      s.pmask = high_mask(s.top);
      s.prefix = kmax[q] & s.pmask;
    }
  }
  while (qs[0].mode == kRefine || qs[1].mode == kRefine) {
    int shift[2], width[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      width[q] = min(8, qs[q].top + 1);
      shift[q] = qs[q].top + 1 - width[q];
    }
    for (int i = lane; i < 2 * kBins; i += kWarp) hist[i] = 0;
    __syncwarp();
    for (int64_t b = lane; b < groups; b += kWarp) {
      row.for_each_candidate(b, [&](int64_t, bool positive, float, uint32_t k) {
        const int q = positive ? 0 : 1;
        if (qs[q].mode == kRefine && (k & qs[q].pmask) == qs[q].prefix)
          atomicAdd(&hist[q * kBins + ((k >> shift[q]) & ((1u << width[q]) - 1u))], 1u);
      });
    }
    __syncwarp();
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      Queue& s = qs[q];
      if (s.mode != kRefine) continue;  // warp-uniform
      uint32_t bin, above, count;
      find_bin(hist + q * kBins, s.need, lane, bin, above, count);
      s.need -= above;
      s.prefix |= bin << shift[q];
      s.pmask |= ((1u << width[q]) - 1u) << shift[q];
      s.top -= width[q];
      if (count == s.need) {
        s.mode = kAtLeast;              // the whole bin is selected: no lower digit matters
      } else if (s.top < 0) {
        s.mode = kTie;                  // all 32 bits resolved; `need` of `count` equal keys
        s.tie_total = count;
      }
    }
    __syncwarp();  // every lane has read hist before it is cleared again
  }

  // ---- 3. collect the selected keys, then order them ------------------------------------
  uint64_t* keys = ws_keys + r * 2 * depth_stride;
  int32_t* queue = ws_cols + r * 2 * depth_stride;
  if (lane == 0) taken[0] = taken[1] = 0;
  __syncwarp();
  const bool any_tie = qs[0].mode == kTie || qs[1].mode == kTie;
  uint32_t tie_base[2] = {0, 0};
  for (int64_t b0 = 0; b0 < groups; b0 += kWarp) {  // warp-uniform trip count (scans inside)
    const int64_t b = b0 + lane;
    const bool valid = b < groups;
    uint32_t before[2] = {0, 0}, total[2] = {0, 0};
    if (any_tie) {
      // Rank equal keys by column: ties of lower lanes (lower columns) come first.
      uint32_t mine[2] = {0, 0};
      if (valid)
        row.for_each_candidate(b, [&](int64_t, bool positive, float, uint32_t k) {
          const int q = positive ? 0 : 1;
          if (qs[q].mode == kTie && k == qs[q].prefix) mine[q] += 1;
        });
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        uint32_t incl = mine[q];
#pragma unroll
        for (int off = 1; off < kWarp; off <<= 1) {
          const uint32_t t = __shfl_up_sync(kFull, incl, off);
          if (lane >= off) incl += t;
        }
        before[q] = tie_base[q] + incl - mine[q];
        total[q] = __shfl_sync(kFull, incl, kWarp - 1);
      }
    }
    if (valid) {
      uint32_t seen[2] = {0, 0};
      row.for_each_candidate(b, [&](int64_t j, bool positive, float g, uint32_t k) {
        const int q = positive ? 0 : 1;
        const Queue& s = qs[q];
        bool pick = false;
        if (s.mode == kAll) {
          pick = true;
        } else if (s.mode == kAtLeast) {
          pick = k >= s.prefix;
        } else if (k > s.prefix) {
          pick = true;
        } else if (k == s.prefix) {
          // grow+ takes the highest columns of a tie first, grow- the lowest
          const uint32_t ordinal = before[q] + seen[q]++;
          pick = positive ? ordinal >= s.tie_total - s.need : ordinal < s.need;
        }
        if (pick) {
          const uint32_t slot = atomicAdd(&taken[q], 1u);
          if (slot < s.depth) keys[q * depth_stride + slot] = grow_key(g, positive, (uint32_t)j);
        }
      });
    }
    tie_base[0] += total[0];
    tie_base[1] += total[1];
  }
  __threadfence_block();
  __syncwarp();
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t n = qs[q].depth;
    const uint64_t* kq = keys + q * depth_stride;
    for (uint32_t i = lane; i < n; i += kWarp) {
      const uint64_t k = kq[i];
      uint32_t rank = 0;  // keys are distinct: rank = how many are larger
      for (uint32_t t = 0; t < n; ++t) rank += kq[t] > k ? 1u : 0u;
      queue[q * depth_stride + rank] = (int32_t)grow_key_col(k, q == 0);
    }
  }
  __threadfence_block();
  __syncwarp();

  // ---- 4. the swap cycles (warp-uniform) --------------------------------------------------
  const int sign0 = sign_of(e);
  int32_t swaps = 0;
  uint32_t next[2] = {0, 0};
  for (uint32_t cycle = 0; cycle < T; ++cycle) {
    if (!(fabs_d(e) > p.threshold)) break;
    const int q = e > 0 ? 0 : 1;
    if (next[q] >= qs[q].depth) break;
    const int64_t g = queue[q * depth_stride + next[q]];
    next[q] += 1;
    const int64_t j0 = g - g % m;
    // Partner: initially kept, not yet pruned by a swap, lowest initial score (ties: column).
    bool ok = false;
    float best_s = 0.0f;
    int best_i = 0;
    for (int i = lane; i < m; i += kWarp) {
      const float wi = row.weight(j0 + i);
      const float si = row.init_score(j0 + i, wi);
      if (row.out[j0 + i] || row.initially_pruned(j0, i, si)) continue;
      if (!ok || score_before(si, i, best_s, best_i)) {
        ok = true;
        best_s = si;
        best_i = i;
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const bool o_ok = __shfl_xor_sync(kFull, ok, off);
      const float o_s = __shfl_xor_sync(kFull, best_s, off);
      const int o_i = __shfl_xor_sync(kFull, best_i, off);
      if (o_ok && (!ok || score_before(o_s, o_i, best_s, best_i))) {
        ok = true;
        best_s = o_s;
        best_i = o_i;
      }
    }
    if (!ok) continue;  // SPEC §5 [deviation]: no partner -> next cycle, no swap
    const int64_t pc = j0 + best_i;
    const float wp = row.weight(pc), wg = row.weight(g);
    const float d_p = mul_rn(wp, p.sum_metric_row[pc]), d_g = mul_rn(wg, p.sum_metric_row[g]);
    const float a_p = mul_rn(fabs_f(wp), p.sqrt_scaler_row[pc]);
    const float a_g = mul_rn(fabs_f(wg), p.sqrt_scaler_row[g]);
    double e2;
    if (!propose_swap(p, e, sign0, d_p, d_g, a_p, a_g, &e2)) break;  // a rejection stops the row
    if (lane == 0) {
      row.out[g] = 0;
      row.out[pc] = 1;
    }
    e = e2;
    ++swaps;
    __threadfence_block();
    __syncwarp();  // the next partner search reads these mask bytes from other lanes
  }
  if (lane == 0) {
    o.swaps[r] = swaps;
    o.error_after[r] = (float)e;
  }
}

cudaError_t launch(const dsnot_nm_problem& p, const dsnot_nm_output& o, uint64_t* keys,
                     int32_t* cols, int64_t depth, cudaStream_t stream) {
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid((unsigned)((p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  switch (p.prune_m) {  // M known at compile time keeps a group in registers
    case 4: nm_refine_kernel<4><<<grid, block, 0, stream>>>(p, o, keys, cols, depth); break;
    case 8: nm_refine_kernel<8><<<grid, block, 0, stream>>>(p, o, keys, cols, depth); break;
    case 16: nm_refine_kernel<16><<<grid, block, 0, stream>>>(p, o, keys, cols, depth); break;
    default: nm_refine_kernel<0><<<grid, block, 0, stream>>>(p, o, keys, cols, depth); break;
  }
  return cudaGetLastError();
}

int64_t queue_depth(int64_t cols, int32_t cycles) { return cycles < cols ? cycles : cols; }

}  // namespace
}  // namespace dsnot

extern "C" int dsnot_nm_has_cuda(void) { return 1; }

extern "C" int dsnot_nm_cuda_probe(void) {
  // The runtime looks the kernel's image up for the current device (loading or JIT-compiling
  // it): every instantiation is compiled for the same architectures, so one answers for all.
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, dsnot::nm_refine_kernel<0>);
  if (err != cudaSuccess) cudaGetLastError();  // (a lookup error is not sticky: clear it)
  return (int)err;
}

extern "C" const char* dsnot_nm_cuda_error_string(int code) {
  return cudaGetErrorString((cudaError_t)code);
}

extern "C" int dsnot_has_cuda_unstructured(void) { return 0; }

extern "C" size_t dsnot_nm_cuda_workspace_bytes(int64_t rows, int64_t cols, int32_t cycles) {
  if (rows <= 0 || cols <= 0 || cycles <= 0) return 0;
  const int64_t depth = dsnot::queue_depth(cols, cycles);
  return (size_t)rows * 2 * (size_t)depth * (sizeof(uint64_t) + sizeof(int32_t));
}

extern "C" int dsnot_nm_refine_cuda(const dsnot_nm_problem* p, const dsnot_nm_output* o, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream) {
  const int status = dsnot_nm_check(p, o);
  if (status != DSNOT_OK) return status;
  if (p->prune_m == 0) return DSNOT_UNSUPPORTED;  // unstructured: CPU path only
  if (p->rows == 0) return DSNOT_OK;
  if (p->rows > (int64_t)0x7FFFFFFF * dsnot::kWarpsPerBlock) return DSNOT_BAD_ARGUMENT;
  const size_t need = dsnot_nm_cuda_workspace_bytes(p->rows, p->cols, p->cycles);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return DSNOT_WORKSPACE;
  const int64_t depth = dsnot::queue_depth(p->cols, p->cycles);
  uint64_t* keys = static_cast<uint64_t*>(workspace);
  int32_t* cols = reinterpret_cast<int32_t*>(keys + p->rows * 2 * depth);
  if (p->cols == 0) {  // nothing to prune; keep the kernel free of this corner
    if (cudaMemsetAsync(o->swaps, 0, sizeof(int32_t) * p->rows, stream) != cudaSuccess ||
        cudaMemsetAsync(o->error_before, 0, sizeof(float) * p->rows, stream) != cudaSuccess ||
        cudaMemsetAsync(o->error_after, 0, sizeof(float) * p->rows, stream) != cudaSuccess)
      return DSNOT_CUDA_ERROR;
    return DSNOT_OK;
  }
  const cudaError_t err = dsnot::launch(*p, *o, keys, cols, depth, stream);
  return err == cudaSuccess ? DSNOT_OK : DSNOT_CUDA_ERROR;
}
