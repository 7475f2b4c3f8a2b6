// test_nm_core.cpp: hand-checkable cases for the torch-free N:M core (run by ctest).
//
// Rows of 8 weights with S = sqrt(Q) = V^p = 1 and magnitude init, so D = G = w, A = |w| and
// every expected swap can be followed on paper (values are exact binary fractions). Then: the
// fp16/bf16 bit conversions, thread-count independence on a random layer, and, when this
// build has CUDA and a GPU is present, the CUDA path against the CPU path.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dsnot_nm.h"
#include "nm_common.h"

#ifdef DSNOT_WITH_CUDA
#include <cuda_runtime.h>
#endif

static int g_failures = 0;

#define EXPECT(cond, ...)                                      \
  do {                                                         \
    if (!(cond)) {                                             \
      ++g_failures;                                            \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                \
      std::printf("\n");                                       \
    }                                                          \
  } while (0)

struct Result {
  std::vector<uint8_t> mask;
  std::vector<int32_t> swaps;
  std::vector<float> before, after;
};

struct Case {
  std::vector<float> w;            // [rows, cols] float32
  int64_t rows = 1, cols = 8;
  int n = 2, m = 4, cycles = 50;  // n = m = 0: unstructured with k pruned per row
  int64_t k = 0;
  double threshold = 0.1;
  bool sign_check = false, improve_check = false, moment_check = false;
  double seq_len = 1.0;
  std::vector<uint8_t> initial;    // empty: built from |w|
  std::vector<float> s, q, v;      // empty: all ones
};

static dsnot_nm_problem make_problem(const Case& c, std::vector<float>& ones) {
  ones.assign(c.cols, 1.0f);
  dsnot_nm_problem p{};
  p.weight = c.w.data();
  p.dtype = DSNOT_FLOAT32;
  p.rows = c.rows;
  p.cols = c.cols;
  p.sum_metric_row = c.s.empty() ? ones.data() : c.s.data();
  p.sqrt_scaler_row = c.q.empty() ? ones.data() : c.q.data();
  p.var_pow = c.v.empty() ? ones.data() : c.v.data();
  p.init_col_scale = ones.data();
  p.initial_mask = c.initial.empty() ? nullptr : c.initial.data();
  p.prune_n = c.n;
  p.prune_m = c.m;
  p.cycles = c.cycles;
  p.threshold = c.threshold;
  p.sign_check = c.sign_check;
  p.improve_check = c.improve_check;
  p.moment_check = c.moment_check;
  p.seq_len = c.seq_len;
  p.pruned_per_row = c.k;
  return p;
}

static Result run_cpu(const dsnot_nm_problem& p, int threads) {
  Result r;
  r.mask.assign(p.rows * p.cols, 7);
  r.swaps.assign(p.rows, -1);
  r.before.assign(p.rows, NAN);
  r.after.assign(p.rows, NAN);
  dsnot_nm_output o{r.mask.data(), r.swaps.data(), r.before.data(), r.after.data()};
  const int status = dsnot_nm_refine_cpu(&p, &o, threads);
  EXPECT(status == DSNOT_OK, "status %d (%s)", status, dsnot_status_string(status));
  return r;
}

static Result run_case(const Case& c) {
  std::vector<float> ones;
  return run_cpu(make_problem(c, ones), 1);
}

static std::string mask_str(const std::vector<uint8_t>& m) {
  std::string s;
  for (uint8_t b : m) s += char('0' + b);
  return s;
}

static void expect_row(const char* name, const Result& r, const char* mask, int swaps, double before,
                       double after) {
  EXPECT(mask_str(r.mask) == mask, "%s: mask %s, expected %s", name, mask_str(r.mask).c_str(), mask);
  EXPECT(r.swaps[0] == swaps, "%s: swaps %d, expected %d", name, r.swaps[0], swaps);
  EXPECT(r.before[0] == (float)before, "%s: error_before %g, expected %g", name, r.before[0], before);
  EXPECT(r.after[0] == (float)after, "%s: error_after %g, expected %g", name, r.after[0], after);
}

static void test_hand_cases() {
  // 2:4, w = [0.5 -0.25 3 4 | 0.75 5 -6 0.125]: pruned (lowest |w|) = cols 0,1 | 4,7,
  // e0 = 0.5 - 0.25 + 0.75 + 0.125 = 1.125 > 0, grow+ (G = w > 0, descending) = 4, 0, 7.
  //   cycle 1: g=4, partner = lowest |w| kept in group 1 = col 5: e = 1.125 + 5 - 0.75 = 5.375
  //   cycle 2: g=0, partner col 2: e = 5.375 + 3 - 0.5 = 7.875
  //   cycle 3: g=7, partner col 6 (5 is pruned now): e = 7.875 - 6 - 0.125 = 1.75
  //   cycle 4: grow+ is empty: stop.
  Case c;
  c.w = {0.5f, -0.25f, 3.f, 4.f, 0.75f, 5.f, -6.f, 0.125f};
  expect_row("2:4 basic", run_case(c), "01100110", 3, 1.125, 1.75);
  c.sign_check = true;  // no sign change along the way
  expect_row("2:4 sign_check", run_case(c), "01100110", 3, 1.125, 1.75);
  c.sign_check = false;
  c.cycles = 1;
  expect_row("2:4 T=1", run_case(c), "11000101", 1, 1.125, 5.375);
  c.cycles = 0;
  expect_row("2:4 T=0", run_case(c), "11001001", 0, 1.125, 1.125);
  c.cycles = 50;
  c.threshold = 2.0;  // |e0| <= tau: nothing to do
  expect_row("2:4 threshold", run_case(c), "11001001", 0, 1.125, 1.125);
  c.threshold = 0.1;
  c.improve_check = true;  // |5.375| < |1.125| fails: the row stops at once
  expect_row("2:4 improve_check", run_case(c), "11001001", 0, 1.125, 1.125);
  c.improve_check = false;
  c.moment_check = true;  // L=1: delta = (e2^2 - e^2) > 0 -> rejected
  expect_row("2:4 moment_check", run_case(c), "11001001", 0, 1.125, 1.125);
  c.moment_check = false;

  // Negative error: w = [-0.5 0.25 3 4 | -0.75 5 -6 -0.125], e0 = -1.125, grow- = 4, 0, 7.
  //   cycle 1: g=4, partner col 5: e2 = -1.125 + 5 + 0.75 = 4.625, the sign flips.
  Case n = c;
  n.w = {-0.5f, 0.25f, 3.f, 4.f, -0.75f, 5.f, -6.f, -0.125f};
  n.cycles = 1;
  expect_row("2:4 negative", run_case(n), "11000101", 1, -1.125, 4.625);
  n.sign_check = true;
  n.cycles = 50;
  expect_row("2:4 negative sign_check", run_case(n), "11001001", 0, -1.125, -1.125);

  // 3:4, w = [0.5 0.25 0.125 8 | 0.1875 0.09375 0.046875 9]: one kept column per group.
  // e0 = 0.875 + 0.328125 = 1.203125; grow+ = 0, 1, 4, 2, 5, 6.
  //   cycle 1: g=0, partner 3: e = 8.703125;  cycle 2: g=1, no partner left: next cycle
  //   cycle 3: g=4, partner 7: e = 17.515625;  cycles 4-6: no partner;  then grow+ is empty.
  Case t;
  t.w = {0.5f, 0.25f, 0.125f, 8.f, 0.1875f, 0.09375f, 0.046875f, 9.f};
  t.n = 3;
  expect_row("3:4 no partner", run_case(t), "01110111", 2, 1.203125, 17.515625);
  t.cycles = 2;  // a cycle without a partner still counts against T
  expect_row("3:4 T=2", run_case(t), "01111110", 1, 1.203125, 8.703125);

  // A given initial mask [0 0 1 1 | 1 1 0 0]: e0 = 3 + 4 + 0.75 + 5 = 12.75, grow+ = 5, 3, 2, 4.
  //   cycle 1: g=5, partner = lowest |w| initially kept in group 1 = col 7: e = 7.875
  //   cycle 2: g=3, partner col 1: e = 7.875 - 0.25 - 4 = 3.625
  //   cycle 3: g=2, partner col 0: e = 3.625 + 0.5 - 3 = 1.125
  //   cycle 4: g=4, partner col 6: e2 = 1.125 - 6 - 0.75 < 0: the sign check rejects, stop.
  Case i = c;
  i.initial = {0, 0, 1, 1, 1, 1, 0, 0};
  i.sign_check = true;
  expect_row("2:4 initial_mask", run_case(i), "11001001", 3, 12.75, 1.125);

  // 1x8 as 4:8 with G = w / V: V scales the growth order but not D.
  // w = [1 2 -3 4 0.5 6 7 8], |w| lowest four: cols 4, 0, 1, 2 pruned; e0 = 1 + 2 - 3 + 0.5 = 0.5.
  // V = [1 0.25 1 1 0.0625 ...]: G = 1, 8, -3, -, 8, ... -> grow+ = col 4 (8), col 1 (8), col 0:
  // G ties between col 1 and col 4 (both 8): the higher column is popped first.
  //   cycle 1: g=4, partner = lowest |w| kept: col 3 (4): e = 0.5 + 4 - 0.5 = 4
  //   cycle 2: g=1, partner col 5 (6): e = 4 + 6 - 2 = 8;  cycle 3: g=0, partner col 6: e = 14
  Case f;
  f.w = {1.f, 2.f, -3.f, 4.f, 0.5f, 6.f, 7.f, 8.f};
  f.n = 4;
  f.m = 8;
  f.v = {1.f, 0.25f, 1.f, 1.f, 0.0625f, 1.f, 1.f, 1.f};
  expect_row("4:8 tie in G", run_case(f), "00110110", 3, 0.5, 14.0);
}

static void test_unstructured_hand_cases() {
  // Unstructured 50%, w = [0.5 -0.25 3 4 0.75 5 -6 0.125]: the four lowest |w| are cols 7, 1,
  // 0, 4 -> pruned 0,1,4,7; e0 = 0.5 - 0.25 + 0.75 + 0.125 = 1.125.
  // Queues: grow+ = 4 (0.75), 0 (0.5), 7 (0.125); grow- = 1 (-0.25);
  //         prune- (kept, D < 0) = 6; prune+ (kept, D > 0, |w| ascending) = 2, 3, 5.
  //   cycle 1: e > 0: g = 4, p = 6: e = 1.125 - 6 - 0.75 = -5.625 (overshoot, accepted)
  //   cycle 2: e < 0: g = 1, p = 2: e = -5.625 + 3 + 0.25 = -2.375
  //   cycle 3: e < 0 and grow- is empty: stop.
  Case c;
  c.w = {0.5f, -0.25f, 3.f, 4.f, 0.75f, 5.f, -6.f, 0.125f};
  c.n = c.m = 0;
  c.k = 4;
  expect_row("unstructured basic", run_case(c), "10100011", 2, 1.125, -2.375);
  c.cycles = 1;
  expect_row("unstructured T=1", run_case(c), "11000011", 1, 1.125, -5.625);
  c.cycles = 0;
  expect_row("unstructured T=0", run_case(c), "11001001", 0, 1.125, 1.125);
  c.cycles = 50;
  c.sign_check = true;  // -5.625 has the other sign: rejected, the row stops
  expect_row("unstructured sign_check", run_case(c), "11001001", 0, 1.125, 1.125);
  c.sign_check = false;
  c.improve_check = true;  // |-5.625| < |1.125| fails
  expect_row("unstructured improve_check", run_case(c), "11001001", 0, 1.125, 1.125);
  c.improve_check = false;
  c.threshold = 2.0;  // |e0| <= tau
  expect_row("unstructured threshold", run_case(c), "11001001", 0, 1.125, 1.125);
  c.threshold = 0.1;
  // Ties: |w| = 1 everywhere, k = 3 prunes the three lowest columns 0, 1, 2 (stable sort);
  // w = [1 1 -1 1 -1 1 1 -1]: e0 = 1 + 1 - 1 = 1; grow+ = 1, 0 (higher column first);
  // prune- = 4, 7 (lower column first).
  //   cycle 1: g = 1, p = 4: e = 1 - 1 - 1 = -1;  cycle 2: grow- = 2, prune+ = 3: e = -1 + 1 + 1 = 1
  //   cycle 3: g = 0, p = 7: e = 1 - 1 - 1 = -1;  cycle 4: grow- is empty: stop.
  Case t = c;
  t.w = {1.f, 1.f, -1.f, 1.f, -1.f, 1.f, 1.f, -1.f};
  t.k = 3;
  expect_row("unstructured ties", run_case(t), "00011001", 3, 1.0, -1.0);
}

static void test_conversions() {
  using dsnot::bf16_bits_to_float;
  using dsnot::half_bits_to_float;
  EXPECT(half_bits_to_float(0x3C00) == 1.0f, "fp16 1.0");
  EXPECT(half_bits_to_float(0xC000) == -2.0f, "fp16 -2.0");
  EXPECT(half_bits_to_float(0x7BFF) == 65504.0f, "fp16 max");
  EXPECT(half_bits_to_float(0x0001) == std::ldexp(1.0f, -24), "fp16 smallest subnormal");
  EXPECT(half_bits_to_float(0x83FF) == -std::ldexp(1023.0f, -24), "fp16 largest negative subnormal");
  EXPECT(half_bits_to_float(0x0400) == std::ldexp(1.0f, -14), "fp16 smallest normal");
  EXPECT(std::isinf(half_bits_to_float(0x7C00)), "fp16 inf");
  EXPECT(std::signbit(half_bits_to_float(0x8000)) && half_bits_to_float(0x8000) == 0.0f, "fp16 -0");
  int mismatches = 0;  // the branch-free host conversion agrees bit for bit everywhere
  for (uint32_t h = 0; h < 65536; ++h)
    mismatches += dsnot::float_to_bits(dsnot::half_bits_to_float_flat((uint16_t)h)) !=
                  dsnot::float_to_bits(half_bits_to_float((uint16_t)h));
  EXPECT(mismatches == 0, "half_bits_to_float_flat differs on %d inputs", mismatches);
  EXPECT(bf16_bits_to_float(0x3F80) == 1.0f, "bf16 1.0");
  EXPECT(bf16_bits_to_float(0xC0A0) == -5.0f, "bf16 -5.0");
}

static Case random_case(int64_t rows, int64_t cols, int n, int m, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(0.25f, 1.25f);
  Case c;
  c.rows = rows;
  c.cols = cols;
  c.n = n;
  c.m = m;
  c.sign_check = true;
  c.w.resize(rows * cols);
  for (float& x : c.w) x = normal(gen);
  c.s.resize(cols);
  c.q.resize(cols);
  c.v.resize(cols);
  for (int64_t j = 0; j < cols; ++j) {
    c.s[j] = normal(gen) * 4.f;
    c.q[j] = uni(gen);
    c.v[j] = uni(gen);
  }
  return c;
}

static void test_threads() {
  const Case c = random_case(37, 256, 2, 4, 1);
  std::vector<float> ones;
  const dsnot_nm_problem p = make_problem(c, ones);
  const Result one = run_cpu(p, 1), four = run_cpu(p, 4);
  EXPECT(one.mask == four.mask && one.swaps == four.swaps && one.after == four.after,
         "1 thread and 4 threads differ");
  long total = 0;
  for (int64_t r = 0; r < c.rows; ++r) {
    total += one.swaps[r];
    for (int64_t b = 0; b < c.cols / 4; ++b) {
      int pruned = 0;
      for (int i = 0; i < 4; ++i) pruned += one.mask[r * c.cols + b * 4 + i];
      EXPECT(pruned == 2, "row %ld group %ld has %d pruned", (long)r, (long)b, pruned);
    }
  }
  EXPECT(total > 0, "no swaps at all on a random layer");
}

// dsnot_nm_cuda_probe: never 0 (runs) without a CUDA path or a device; 0 on a GPU this build
// targets (sm_80 or newer), the CUDA error otherwise; no error left behind, device unchanged.
static void test_cuda_probe() {
#ifdef DSNOT_WITH_CUDA
  int devices = 0;
  const bool have_gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  cudaGetLastError();
  int before = -1;
  if (have_gpu) cudaGetDevice(&before);
  const int code = dsnot_nm_cuda_probe();
  EXPECT(dsnot_nm_cuda_error_string(code) != nullptr, "no message for code %d", code);
  if (!have_gpu) {   // (then CUDA's own initialisation error stays: every call returns it)
    EXPECT(code != 0, "no CUDA device, yet the probe says the kernels run");
    return;
  }
  EXPECT(cudaGetLastError() == cudaSuccess, "the probe left a CUDA error behind (code %d)", code);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, before);
  int after = -1;
  cudaGetDevice(&after);
  EXPECT(after == before, "the probe changed the current device %d -> %d", before, after);
  EXPECT((code == 0) == (prop.major >= 8), "sm_%d%d: probe code %d (%s)", prop.major, prop.minor, code,
         dsnot_nm_cuda_error_string(code));
#else
  EXPECT(dsnot_nm_cuda_probe() == -1, "a build without CUDA claims a CUDA probe result");
#endif
}

#ifdef DSNOT_WITH_CUDA
// The CUDA path against the CPU path on random layers (skipped without a GPU).
static void test_cuda_matches_cpu() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skip: no CUDA device\n");
    cudaGetLastError();
    return;
  }
  const int shapes[][4] = {{33, 512, 2, 4}, {7, 1024, 4, 8}, {5, 960, 8, 16}, {9, 480, 3, 4}, {6, 480, 5, 24}};
  for (const auto& s : shapes) {
    Case c = random_case(s[0], s[1], s[2], s[3], 7);
    std::vector<float> ones;
    const dsnot_nm_problem hp = make_problem(c, ones);
    const Result want = run_cpu(hp, 2);
    const size_t n = c.rows * c.cols;
    float *w, *vec;
    uint8_t* mask;
    int32_t* swaps;
    float* err;
    void* ws;
    const size_t ws_bytes = dsnot_nm_cuda_workspace_bytes(c.rows, c.cols, c.cycles);
    cudaMalloc(&w, n * 4);
    cudaMalloc(&vec, 4 * c.cols * 4);
    cudaMalloc(&mask, n);
    cudaMalloc(&swaps, c.rows * 4);
    cudaMalloc(&err, 2 * c.rows * 4);
    cudaMalloc(&ws, ws_bytes);
    cudaMemcpy(w, c.w.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(vec, c.s.data(), c.cols * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(vec + c.cols, c.q.data(), c.cols * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(vec + 2 * c.cols, c.v.data(), c.cols * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(vec + 3 * c.cols, ones.data(), c.cols * 4, cudaMemcpyHostToDevice);
    dsnot_nm_problem dp = hp;
    dp.weight = w;
    dp.sum_metric_row = vec;
    dp.sqrt_scaler_row = vec + c.cols;
    dp.var_pow = vec + 2 * c.cols;
    dp.init_col_scale = vec + 3 * c.cols;
    dsnot_nm_output o{mask, swaps, err, err + c.rows};
    const int status = dsnot_nm_refine_cuda(&dp, &o, ws, ws_bytes, nullptr);
    EXPECT(status == DSNOT_OK, "cuda status %d", status);
    Result got;
    got.mask.resize(n);
    got.swaps.resize(c.rows);
    got.after.resize(c.rows);
    cudaMemcpy(got.mask.data(), mask, n, cudaMemcpyDeviceToHost);
    cudaMemcpy(got.swaps.data(), swaps, c.rows * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(got.after.data(), err + c.rows, c.rows * 4, cudaMemcpyDeviceToHost);
    EXPECT(cudaDeviceSynchronize() == cudaSuccess, "cuda error");
    EXPECT(got.mask == want.mask, "%d:%d cuda mask differs", s[2], s[3]);
    EXPECT(got.swaps == want.swaps, "%d:%d cuda swaps differ", s[2], s[3]);
    for (int64_t r = 0; r < c.rows; ++r)
      EXPECT(std::fabs(got.after[r] - want.after[r]) <= 1e-5f * (std::fabs(want.after[r]) + 1.f),
             "%d:%d row %ld error_after %g vs %g", s[2], s[3], (long)r, got.after[r], want.after[r]);
    cudaFree(w);
    cudaFree(vec);
    cudaFree(mask);
    cudaFree(swaps);
    cudaFree(err);
    cudaFree(ws);
  }
}
#endif

int main() {
  test_hand_cases();
  test_unstructured_hand_cases();
  test_conversions();
  test_threads();
  test_cuda_probe();
#ifdef DSNOT_WITH_CUDA
  test_cuda_matches_cpu();
#endif
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all nm core checks passed\n");
  return 0;
}
