// binding.cpp: the ONLY file that includes torch headers. It checks the tensors (errors name
// the argument), allocates the outputs, and calls the torch-free core (dsnot_nm.h): the C++
// CPU path for CPU tensors and, when built with DSNOT_WITH_CUDA, the CUDA path for CUDA
// tensors on the current stream. Exposed as the pybind module dsnot_kernels._C.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "dsnot_nm.h"

#ifdef DSNOT_WITH_CUDA
// c10's stream/guard headers only: ATen/cuda/CUDAContext.h would also pull in cuBLAS and
// cuSPARSE headers, which a minimal CUDA toolkit does not have.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

int32_t dtype_tag(const torch::Tensor& weight) {
  switch (weight.scalar_type()) {
    case torch::kFloat32: return DSNOT_FLOAT32;
    case torch::kFloat16: return DSNOT_FLOAT16;
    case torch::kBFloat16: return DSNOT_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "weight must be float32, float16 or bfloat16, got ", weight.scalar_type());
  }
  return -1;
}

void check_column_vector(const torch::Tensor& t, const char* name, const torch::Tensor& weight) {
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == weight.size(1), name, " must have shape [",
                    weight.size(1), "] (weight's in_features), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == weight.device(), name, " is on ", t.device(), " but weight is on ",
                    weight.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_matrix(const torch::Tensor& t, const char* name, const torch::Tensor& weight,
                  torch::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == weight.sizes(), name, " must have the weight's shape ", weight.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == weight.device(), name, " is on ", t.device(), " but weight is on ",
                    weight.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// The shared body of refine_nm / refine_unstructured: prune_m = 0 means unstructured with
// pruned_per_row pruned weights per row.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> refine_any(
    const torch::Tensor& weight, const torch::Tensor& sum_metric_row, const torch::Tensor& sqrt_scaler_row,
    const torch::Tensor& var_pow, const std::optional<torch::Tensor>& init_col_scale,
    const std::optional<torch::Tensor>& init_score, const std::optional<torch::Tensor>& initial_mask,
    int64_t prune_n, int64_t prune_m, int64_t pruned_per_row, int64_t cycles, double threshold,
    bool sign_check, bool improve_check, bool moment_check, double seq_len) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out, in], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight must be contiguous");
  const int32_t dtype = dtype_tag(weight);
  const bool unstructured = prune_m == 0;
  if (unstructured) {
    TORCH_CHECK_VALUE(0 <= pruned_per_row && pruned_per_row <= weight.size(1),
                      "pruned_per_row must be in [0, in_features=", weight.size(1), "], got ", pruned_per_row);
  } else {
    TORCH_CHECK_VALUE(1 <= prune_n && prune_n < prune_m && prune_m <= (1 << 20),
                      "prune_n/prune_m must satisfy 1 <= N < M, got ", prune_n, ":", prune_m);
    TORCH_CHECK_VALUE(weight.size(1) % prune_m == 0, "weight's in_features (", weight.size(1),
                      ") must be a multiple of M=", prune_m);
  }
  TORCH_CHECK_VALUE(0 <= cycles && cycles <= INT32_MAX, "cycles must be in [0, 2^31), got ", cycles);
  TORCH_CHECK_VALUE(threshold >= 0, "threshold must be >= 0, got ", threshold);
  check_column_vector(sum_metric_row, "sum_metric_row", weight);
  check_column_vector(sqrt_scaler_row, "sqrt_scaler_row", weight);
  check_column_vector(var_pow, "var_pow", weight);
  if (unstructured && initial_mask.has_value()) {  // the score is only needed to build the mask
    TORCH_CHECK_VALUE(!(init_col_scale.has_value() && init_score.has_value()),
                      "give at most one of init_col_scale and init_score");
  } else {
    TORCH_CHECK_VALUE(init_col_scale.has_value() != init_score.has_value(),
                      "give exactly one of init_col_scale and init_score");
  }
  if (init_col_scale) check_column_vector(*init_col_scale, "init_col_scale", weight);
  if (init_score) check_matrix(*init_score, "init_score", weight, torch::kFloat32);
  if (initial_mask) check_matrix(*initial_mask, "initial_mask", weight, torch::kBool);

  const auto rows = weight.size(0);
  auto mask = torch::empty(weight.sizes(), weight.options().dtype(torch::kBool));
  auto swaps = torch::empty({rows}, weight.options().dtype(torch::kInt32));
  auto error_before = torch::empty({rows}, weight.options().dtype(torch::kFloat32));
  auto error_after = torch::empty({rows}, weight.options().dtype(torch::kFloat32));

  dsnot_nm_problem p{};
  p.weight = weight.data_ptr();
  p.dtype = dtype;
  p.rows = rows;
  p.cols = weight.size(1);
  p.sum_metric_row = sum_metric_row.data_ptr<float>();
  p.sqrt_scaler_row = sqrt_scaler_row.data_ptr<float>();
  p.var_pow = var_pow.data_ptr<float>();
  p.init_col_scale = init_col_scale ? init_col_scale->data_ptr<float>() : nullptr;
  p.init_score = init_score ? init_score->data_ptr<float>() : nullptr;
  p.initial_mask = initial_mask ? reinterpret_cast<const uint8_t*>(initial_mask->data_ptr<bool>()) : nullptr;
  p.prune_n = (int32_t)prune_n;
  p.prune_m = (int32_t)prune_m;
  p.cycles = (int32_t)cycles;
  p.threshold = threshold;
  p.sign_check = sign_check;
  p.improve_check = improve_check;
  p.moment_check = moment_check;
  p.seq_len = seq_len;
  p.pruned_per_row = unstructured ? pruned_per_row : 0;
  dsnot_nm_output o{};
  o.pruned_mask = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  o.swaps = swaps.data_ptr<int32_t>();
  o.error_before = error_before.data_ptr<float>();
  o.error_after = error_after.data_ptr<float>();

  int status = DSNOT_OK;
  if (weight.is_cpu()) {
    const int threads = at::get_num_threads();  // follows torch.set_num_threads
    pybind11::gil_scoped_release no_gil;
    status = dsnot_nm_refine_cpu(&p, &o, threads);
  } else if (weight.is_cuda()) {
#ifdef DSNOT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(weight.device());
    const size_t bytes = dsnot_nm_cuda_workspace_bytes(p.rows, p.cols, p.cycles);
    auto workspace = torch::empty({(int64_t)std::max<size_t>(bytes, 1)}, weight.options().dtype(torch::kUInt8));
    status = dsnot_nm_refine_cuda(&p, &o, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "dsnot_kernels._C was built without CUDA; rebuild with nvcc and a CUDA torch");
#endif
  } else {
    TORCH_CHECK(false, "weight must be on a CPU or CUDA device, got ", weight.device());
  }
  TORCH_CHECK(status == DSNOT_OK, "dsnot_kernels._C refine failed: ", dsnot_status_string(status));
  return {mask, swaps, error_before, error_after};
}

// refine_nm(weight [out, in], S [in], sqrt(Q) [in], V^p [in], init_col_scale [in]?, init_score
// [out, in]?, initial_mask [out, in] bool?, N, M, cycles, threshold, sign_check, improve_check,
// moment_check, seq_len) -> (pruned_mask bool [out, in], swaps int32 [out],
// error_before float32 [out], error_after float32 [out])
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> refine_nm(
    const torch::Tensor& weight, const torch::Tensor& sum_metric_row, const torch::Tensor& sqrt_scaler_row,
    const torch::Tensor& var_pow, const std::optional<torch::Tensor>& init_col_scale,
    const std::optional<torch::Tensor>& init_score, const std::optional<torch::Tensor>& initial_mask,
    int64_t prune_n, int64_t prune_m, int64_t cycles, double threshold, bool sign_check,
    bool improve_check, bool moment_check, double seq_len) {
  TORCH_CHECK_VALUE(prune_m >= 1, "prune_m must be >= 1 for an N:M pattern, got ", prune_m);
  return refine_any(weight, sum_metric_row, sqrt_scaler_row, var_pow, init_col_scale, init_score,
                    initial_mask, prune_n, prune_m, 0, cycles, threshold, sign_check, improve_check,
                    moment_check, seq_len);
}

// refine_unstructured(...same tensors..., pruned_per_row k, cycles, threshold, sign_check,
// improve_check, moment_check, seq_len) -> the same four outputs (SPEC §4).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> refine_unstructured(
    const torch::Tensor& weight, const torch::Tensor& sum_metric_row, const torch::Tensor& sqrt_scaler_row,
    const torch::Tensor& var_pow, const std::optional<torch::Tensor>& init_col_scale,
    const std::optional<torch::Tensor>& init_score, const std::optional<torch::Tensor>& initial_mask,
    int64_t pruned_per_row, int64_t cycles, double threshold, bool sign_check, bool improve_check,
    bool moment_check, double seq_len) {
  return refine_any(weight, sum_metric_row, sqrt_scaler_row, var_pow, init_col_scale, init_score,
                    initial_mask, 0, 0, pruned_per_row, cycles, threshold, sign_check, improve_check,
                    moment_check, seq_len);
}

}  // namespace

// No exception leaves this module: every entry point catches and returns ("TypeError" |
// "ValueError" | "RuntimeError", message) instead of the four outputs, and dsnot_kernels/ext.py
// (ext.call) raises the matching Python exception. This was done because in a CUDA build on
// torch 2.11+cu130 (H100) a bad argument crashed the process; it did not cure that crash (the
// cause is still open, see tests/test_ext.py CRASHES_IN_CUDA_BUILD), but it keeps the error
// path independent of pybind11's exception translation.
template <typename Body>
pybind11::object returning_errors(Body&& body) {
  try {
    auto out = body();
    return pybind11::make_tuple(std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  } catch (const c10::TypeError& e) {
    return pybind11::make_tuple("TypeError", e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    return pybind11::make_tuple("ValueError", e.what_without_backtrace());
  } catch (const c10::Error& e) {
    return pybind11::make_tuple("RuntimeError", e.what_without_backtrace());
  } catch (const std::exception& e) {
    return pybind11::make_tuple("RuntimeError", e.what());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsnot_kernels._C: compiled DSnoT mask swaps (N:M and unstructured) (C++ CPU path, optional CUDA path). "
            "refine_* return the four outputs, or (error kind, message): call them through dsnot_kernels.ext.call";
  m.def("refine_nm", [](const torch::Tensor& weight, const torch::Tensor& sum_metric_row,
                        const torch::Tensor& sqrt_scaler_row, const torch::Tensor& var_pow,
                        const std::optional<torch::Tensor>& init_col_scale,
                        const std::optional<torch::Tensor>& init_score,
                        const std::optional<torch::Tensor>& initial_mask, int64_t prune_n, int64_t prune_m,
                        int64_t cycles, double threshold, bool sign_check, bool improve_check,
                        bool moment_check, double seq_len) {
          return returning_errors([&] {
            return refine_nm(weight, sum_metric_row, sqrt_scaler_row, var_pow, init_col_scale, init_score,
                             initial_mask, prune_n, prune_m, cycles, threshold, sign_check, improve_check,
                             moment_check, seq_len);
          });
        }, "SPEC §2-§5 for an N:M pattern; see csrc/dsnot_nm.h",
        pybind11::arg("weight"), pybind11::arg("sum_metric_row"), pybind11::arg("sqrt_scaler_row"),
        pybind11::arg("var_pow"), pybind11::arg("init_col_scale"), pybind11::arg("init_score"),
        pybind11::arg("initial_mask"), pybind11::arg("prune_n"), pybind11::arg("prune_m"),
        pybind11::arg("cycles"), pybind11::arg("threshold"), pybind11::arg("sign_check"),
        pybind11::arg("improve_check"), pybind11::arg("moment_check"), pybind11::arg("seq_len"));
  m.def("refine_unstructured", [](const torch::Tensor& weight, const torch::Tensor& sum_metric_row,
                                  const torch::Tensor& sqrt_scaler_row, const torch::Tensor& var_pow,
                                  const std::optional<torch::Tensor>& init_col_scale,
                                  const std::optional<torch::Tensor>& init_score,
                                  const std::optional<torch::Tensor>& initial_mask, int64_t pruned_per_row,
                                  int64_t cycles, double threshold, bool sign_check, bool improve_check,
                                  bool moment_check, double seq_len) {
          return returning_errors([&] {
            return refine_unstructured(weight, sum_metric_row, sqrt_scaler_row, var_pow, init_col_scale,
                                       init_score, initial_mask, pruned_per_row, cycles, threshold,
                                       sign_check, improve_check, moment_check, seq_len);
          });
        }, "SPEC §2-§4 for unstructured sparsity; see csrc/dsnot_nm.h",
        pybind11::arg("weight"), pybind11::arg("sum_metric_row"), pybind11::arg("sqrt_scaler_row"),
        pybind11::arg("var_pow"), pybind11::arg("init_col_scale"), pybind11::arg("init_score"),
        pybind11::arg("initial_mask"), pybind11::arg("pruned_per_row"), pybind11::arg("cycles"),
        pybind11::arg("threshold"), pybind11::arg("sign_check"), pybind11::arg("improve_check"),
        pybind11::arg("moment_check"), pybind11::arg("seq_len"));
  m.def("has_cuda_unstructured", []() { return dsnot_has_cuda_unstructured() != 0; },
        "True if built with the CUDA path for unstructured problems");
  m.def("has_cuda", []() { return dsnot_nm_has_cuda() != 0; }, "True if built with the CUDA path");
  m.def("cuda_probe",
        []() { const int code = dsnot_nm_cuda_probe(); return pybind11::make_tuple(code, dsnot_nm_cuda_error_string(code)); },
        "(code, message): code 0 if the current CUDA device can run the CUDA path's kernels, else "
        "the CUDA error of looking them up (-1 without a CUDA path); see csrc/dsnot_nm.h");
}
