// dsnot_nm.h: the torch-free C API of the compiled mask-swap core (SPEC §2-§5): N:M patterns
// and (prune_m = prune_n = 0) unstructured sparsity. The "nm" in the names is historical.
//
// Everything here takes raw pointers and sizes; nothing includes torch. The CPU paths
// (nm_refine_cpu.cpp, unstructured_refine_cpu.cpp) and the CUDA paths (nm_refine_cuda.cu,
// unstructured_refine_cuda.cu) compute bit-for-bit the same result as
// dsnot_kernels/reference.py on tie-free inputs:
//
//   w      = float32(W[r, j])                     exact conversion from fp32/fp16/bf16 bits
//   D[j]   = w * S[j]                             float32
//   G[j]   = D[j] / var_pow[j]                    float32, IEEE round-to-nearest division
//   A[j]   = |w| * sqrt_scaler_row[j]             float32
//   s0[j]  = |w| * init_col_scale[j]  or  init_score[r, j]      initial score, low = pruned first
//   mask   = N lowest s0 of every M columns (N:M) or the k = pruned_per_row lowest s0 of the
//            row (unstructured), ties: lower column first, unless initial_mask is given
//   e      = sum over pruned j of (double)D[j]    float64
//   grow+  = pruned j with G > 0, G descending (ties: higher column first)   top T only
//   grow-  = pruned j with G < 0, G ascending  (ties: lower column first)    top T only
//   N:M: up to T cycles of SPEC §5 with the group-local partner (initially kept, not yet
//   pruned, lowest s0, ties lower column);
//   unstructured: prune- = kept j with D < 0, prune+ = kept j with D > 0, both A ascending
//   (ties: lower column first), top T only, and up to T cycles of SPEC §4;
//   each swap must pass the acceptance tests sign / improve / moment.
//
// Shapes: weight, init_score, initial_mask, pruned_mask are [rows, cols] row-major contiguous;
// per-column vectors are [cols] float32; swaps / errors are [rows].
#ifndef DSNOT_NM_H_
#define DSNOT_NM_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The same opaque type as the CUDA runtime's cudaStream_t (an identical typedef is legal), so
// this header compiles without CUDA headers.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

enum dsnot_dtype {
  DSNOT_FLOAT32 = 0,   // weight holds float
  DSNOT_FLOAT16 = 1,   // weight holds uint16_t IEEE binary16 bits
  DSNOT_BFLOAT16 = 2,  // weight holds uint16_t bfloat16 bits
};

enum dsnot_status {
  DSNOT_OK = 0,
  DSNOT_BAD_ARGUMENT = 1,   // a size, pointer or dtype is out of range
  DSNOT_NO_MEMORY = 2,      // a host allocation failed
  DSNOT_CUDA_ERROR = 3,     // a kernel launch failed (see cudaGetLastError)
  DSNOT_NO_CUDA = 4,        // the core was built without CUDA
  DSNOT_WORKSPACE = 5,      // the CUDA workspace is smaller than dsnot_nm_cuda_workspace_bytes
  DSNOT_UNSUPPORTED = 6,    // this path does not implement the problem's pattern
};

// One refinement problem (inputs). Nullable pointers are marked. prune_n = prune_m = 0 means
// unstructured with pruned_per_row pruned weights per row.
typedef struct dsnot_nm_problem {
  const void* weight;            // [rows, cols] in `dtype`
  int32_t dtype;                 // enum dsnot_dtype
  int64_t rows;
  int64_t cols;                  // a multiple of prune_m
  const float* sum_metric_row;   // [cols] S
  const float* sqrt_scaler_row;  // [cols] sqrt(Q)
  const float* var_pow;          // [cols] max(V, tiny)^p
  const float* init_col_scale;   // [cols] or NULL: initial score = |w| * init_col_scale
  const float* init_score;       // [rows, cols] or NULL: initial score given (one of the two;
                                 // both NULL is allowed for unstructured with an initial_mask)
  const uint8_t* initial_mask;   // [rows, cols] 0/1 (1 = pruned) or NULL: build from the score
  int32_t prune_n;               // N pruned of every M (0 with prune_m = 0: unstructured)
  int32_t prune_m;
  int32_t cycles;                // T >= 0, the cycle budget per row
  double threshold;              // tau: a row stops once |e| <= tau
  int32_t sign_check;            // 0/1
  int32_t improve_check;         // 0/1
  int32_t moment_check;          // 0/1
  double seq_len;                // L (moment check only)
  int64_t pruned_per_row;        // k, unstructured only (0 <= k <= cols; ignored for N:M)
} dsnot_nm_problem;

// Where the results go (all device pointers for the CUDA path).
typedef struct dsnot_nm_output {
  uint8_t* pruned_mask;   // [rows, cols] 0/1, 1 = pruned
  int32_t* swaps;         // [rows]
  float* error_before;    // [rows]
  float* error_after;     // [rows]
} dsnot_nm_output;

// Checks sizes and pointers; DSNOT_OK or DSNOT_BAD_ARGUMENT (also used by the launchers).
int dsnot_nm_check(const dsnot_nm_problem* problem, const dsnot_nm_output* output);

// CPU path: rows in parallel on `num_threads` std::threads (<= 0: hardware concurrency).
int dsnot_nm_refine_cpu(const dsnot_nm_problem* problem, const dsnot_nm_output* output,
                        int num_threads);

// Bytes of device scratch the CUDA path needs (the per-row candidate queues; enough for
// either pattern).
size_t dsnot_nm_cuda_workspace_bytes(int64_t rows, int64_t cols, int32_t cycles);

// CUDA path: all pointers on the current device; asynchronous on `stream`. Returns
// DSNOT_CUDA_ERROR if the launch failed, DSNOT_NO_CUDA if built without CUDA.
int dsnot_nm_refine_cuda(const dsnot_nm_problem* problem, const dsnot_nm_output* output,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream);

// 1 if this build contains the CUDA path (N:M).
int dsnot_nm_has_cuda(void);

// Whether the current CUDA device can run this build's kernels: 0 (cudaSuccess) if the binary
// holds an image it loads (a cubin for its architecture, or PTX the driver compiles for it),
// else the cudaError_t that looking the kernel up gave (e.g. no image for a pre-Ampere GPU:
// the kernels need sm_80; PTX newer than the driver); -1 in a build without CUDA. It neither
// switches devices nor leaves an error of its own for a later cudaGetLastError.
int dsnot_nm_cuda_probe(void);

// cudaGetErrorString of a code from dsnot_nm_cuda_probe ("no CUDA path" without CUDA).
const char* dsnot_nm_cuda_error_string(int code);

// 1 if this build's CUDA path also handles unstructured problems (else dsnot_nm_refine_cuda
// answers DSNOT_UNSUPPORTED for them).
int dsnot_has_cuda_unstructured(void);

// A short English description of a status code.
const char* dsnot_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif  // DSNOT_NM_H_
