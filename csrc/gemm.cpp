// The GEMMs of the time loops: x·weightᵀ (+ bias) (+ addend). On CUDA always ATen (cuBLAS). On
// the CPU there are up to three paths, and which one is fastest depends on the CPU, the shape, the
// dtype and the thread count, so nothing is hard-coded: the first GEMM of each
// (kind, rows, N, K, dtype, threads) in the process times every path that this CPU and library
// support for that dtype, in rotating rounds, and the fastest is cached (the way
// torch.backends.cudnn.benchmark chooses convolution algorithms). The paths:
//   aten    ATen's addmm/mm (MKL or OpenBLAS sgemm), in place into the addend;
//   onednn  oneDNN's matmul (torch's mkldnn::_linear_pointwise), the weight reordered once per
//           call into oneDNN's blocked layout (mkldnn::_reorder_linear_weight) for repeated GEMMs;
//   packed  MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute, found in libtorch_cpu at
//           run time; float32 only): the weight packed once per call, every step then computes
//           straight into the addend with no allocation and no dispatcher call.
//   simd    our own kernels (cpu/small_gemm_kernels.h; float32): one-off GEMMs of up to
//           kSimdDotMaxRows rows, and repeated ones of a few rows and as many in all, take dot
//           products over the weight as it is stored, nothing prepared; other repeated GEMMs,
//           and one-off GEMMs of more rows, pack the weight (once per call) into k-major panels
//           (a weight stored transposed, W_ihᵀ, is read as stored instead) and compute outer
//           products; in a time loop each thread's
//           share of the weight stays in its core's cache (layer.cpp and cell.cpp also fuse the
//           forward step's GEMM with the pointwise step). The weight gradients' aᵀ·b (gemm_tn)
//           read b's rows as stored, as panels.
// The weight gradients choose between aten and simd only (the others take no transposed operands).
// LSTM_FUSED_CPU_GEMM=auto|aten|onednn|packed|simd (read once, at the first GEMM) or
// lstm_fused.cpu_gemm.set_mode() forces a path where it supports the dtype (ATen otherwise).
// A path computes the same bits every time for the same operands and thread count.
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <string>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu/small_gemm.h"
#include "ops.h"

namespace lstm_fused {

namespace {

using LinearBinary = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                            c10::string_view);
using LinearUnary = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view,
                           c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
using ReorderWeight = Tensor(const Tensor&, std::optional<int64_t>);

// torch's oneDNN linear ops, looked up once in the dispatcher (absent in builds without oneDNN).
struct OneDnnLinear {
  std::optional<c10::TypedOperatorHandle<LinearUnary>> unary;
  std::optional<c10::TypedOperatorHandle<LinearBinary>> binary;
  std::optional<c10::TypedOperatorHandle<ReorderWeight>> reorder;

  OneDnnLinear() {
    if (!at::hasMKLDNN()) return;
    auto& dispatcher = c10::Dispatcher::singleton();
    auto u = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    auto b = dispatcher.findSchema({"mkldnn::_linear_pointwise", "binary"});
    auto r = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
    if (u && b) unary = u->typed<LinearUnary>(), binary = b->typed<LinearBinary>();
    if (r) reorder = r->typed<ReorderWeight>();
  }
};

const OneDnnLinear& onednn() {
  static const OneDnnLinear ops;
  return ops;
}

// MKL's packed sgemm, as exported by libtorch_cpu when torch is built with MKL (CBLAS enums and
// MKL_INT = int, the LP64 interface torch links).
struct MklPacked {
  using GetSize = size_t (*)(int identifier, int m, int n, int k);
  using Pack = void (*)(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                        const float* src, int ld, float* dest);
  using Compute = void (*)(int layout, int transa, int transb, int m, int n, int k,
                           const float* a, int lda, const float* b, int ldb, float beta,
                           float* c, int ldc);
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151,
                       kBMatrix = 162;
  GetSize get_size = nullptr;
  Pack pack = nullptr;
  Compute compute = nullptr;

  MklPacked() {
    get_size = reinterpret_cast<GetSize>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack_get_size"));
    pack = reinterpret_cast<Pack>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack"));
    compute = reinterpret_cast<Compute>(dlsym(RTLD_DEFAULT, "cblas_sgemm_compute"));
  }
  bool available() const { return get_size && pack && compute; }
};

const MklPacked& mkl_packed() {
  static const MklPacked functions;
  return functions;
}

std::atomic<CpuGemmKernelsSource>& simd_source() {
  static std::atomic<CpuGemmKernelsSource> source{nullptr};
  return source;
}

const CpuGemmKernels& simd_kernels() { return simd_source().load()(); }

constexpr std::array<CpuGemmPath, 4> kPaths = {CpuGemmPath::Aten, CpuGemmPath::OneDnn,
                                               CpuGemmPath::Packed, CpuGemmPath::Simd};


std::optional<CpuGemmPath> parse_path(c10::string_view name) {
  if (name == "auto") return CpuGemmPath::Auto;
  if (name == "aten") return CpuGemmPath::Aten;
  if (name == "onednn") return CpuGemmPath::OneDnn;
  if (name == "packed") return CpuGemmPath::Packed;
  if (name == "simd") return CpuGemmPath::Simd;
  return std::nullopt;
}

// The forced path: LSTM_FUSED_CPU_GEMM, read once, until set_cpu_gemm_mode() changes it.
std::atomic<CpuGemmPath>& forced_path() {
  static std::atomic<CpuGemmPath> path = [] {
    const char* env = std::getenv("LSTM_FUSED_CPU_GEMM");
    if (env == nullptr) return CpuGemmPath::Auto;
    const auto parsed = parse_path(env);
    TORCH_CHECK_VALUE(parsed.has_value(), "lstm_fused: LSTM_FUSED_CPU_GEMM must be auto, aten, "
                      "onednn, packed or simd, got '", env, "'");
    return *parsed;
  }();
  return path;
}

// oneDNN has no float16 matmul worth having on most CPUs and no bfloat16 inner product without
// AVX-512 bf16 support ("could not create a primitive descriptor"): whether it runs a dtype is
// asked once, by running a tiny GEMM.
bool onednn_runs(at::ScalarType dtype) {
  static std::mutex mutex;
  static std::map<at::ScalarType, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(dtype);
  if (found != known.end()) return found->second;
  bool ok = false;
  try {
    const auto options = at::TensorOptions().dtype(dtype);
    onednn().unary->call(at::ones({2, 16}, options), at::ones({8, 16}, options), std::nullopt,
                         "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    ok = true;
  } catch (const std::exception&) {
  }
  return known[dtype] = ok;
}

bool supports(CpuGemmPath path, at::ScalarType dtype) {
  switch (path) {
    case CpuGemmPath::Aten:
      return true;
    case CpuGemmPath::OneDnn:
      return (dtype == at::kFloat || dtype == at::kBFloat16) && onednn().unary.has_value() &&
             onednn().reorder.has_value() && onednn_runs(dtype);
    case CpuGemmPath::Packed:
      return dtype == at::kFloat && mkl_packed().available();
    case CpuGemmPath::Simd:
      return dtype == at::kFloat && simd_source().load() != nullptr;
    case CpuGemmPath::Auto:
      break;
  }
  return false;
}

// Whether `path` can run a GEMM of `rows` rows, one-off or repeated (MKL's packing pays off only
// when the weight is reused), with transposed operands (ATen's and ours only).
bool fits(CpuGemmPath path, int64_t /*rows*/, bool repeated, bool transposed) {
  if (transposed) return path == CpuGemmPath::Aten || path == CpuGemmPath::Simd;
  if (path == CpuGemmPath::Packed) return repeated;
  return true;
}

// --- the cache of measured choices -----------------------------------------------------------

struct Choices {
  std::mutex mutex;
  std::map<GemmKey, CpuGemmChoice> entries;
};

Choices& choices() {
  static Choices c;
  return c;
}

// The test hook's timings (set_cpu_gemm_test_times): none, normally.
struct TestTimes {
  std::mutex mutex;
  std::map<CpuGemmPath, std::vector<double>> trials;
  double run_seconds = -1;
};

TestTimes& test_times() {
  static TestTimes t;
  return t;
}

// The robustness of the choice. Trials interleave the candidates (round r runs them in an order
// rotated by r, so a slow spell hits each path in turn rather than one path's run of trials) and
// each path's median over at least kMinRounds rounds decides: one disturbed trial in a path (or
// up to half of them) moves its median by at most one rank. A path other than the default (the
// first candidate: ATen, or for a weight in column groups our simd kernel, the one path that
// computes each thread's units where that thread's step reads them next and adds the bias in its
// tiles, which no trial of the GEMM alone sees) is taken only when its median beats the
// default's by kMargin, so a near-tie, whose winner noise decides, always resolves the same way.
// Afterwards, every kSampleEvery-th step of a repeated GEMM at its full row count is timed (two
// clock reads, not the first step of a call, whose weight may not be in the cache yet);
// kSlowStreak samples in a row slower than kSlowFactor times the trial's median mark the choice
// stale, and the next call of that shape measures again, at most kMaxMeasurements times per shape
// (a machine that stays slow is measured slow).
constexpr int kMinRounds = 7, kMaxRounds = 25;
constexpr double kBudgetSeconds = 0.02;  // per candidate, after kMinRounds
constexpr double kMargin = 0.05;
constexpr int64_t kSampleEvery = 16;
constexpr int kSlowStreak = 8;
constexpr double kSlowFactor = 3.0;
constexpr int kMaxMeasurements = 4;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The path chosen from each candidate's trial seconds: the fastest median, unless it is not
// kMargin faster than the default (paths.front()).
size_t chosen_index(std::vector<std::vector<double>>& times) {
  std::vector<double> medians;
  for (auto& t : times) {
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    medians.push_back(t[t.size() / 2]);
  }
  const size_t best = std::min_element(medians.begin(), medians.end()) - medians.begin();
  return medians[best] < (1 - kMargin) * medians.front() ? best : 0;
}

struct Measured {
  CpuGemmPath path;
  std::shared_ptr<ChoiceHealth> health;
};

// The choice among `paths` for `key`, measured by `trial(path)` (one GEMM) on first use, or again
// when its health went stale. About 20 ms per path at most.
template <typename Trial>
Measured measured_choice(const GemmKey& key, const std::vector<CpuGemmPath>& paths,
                         const Trial& trial) {
  if (paths.size() == 1) return {paths.front(), nullptr};
  int measurements = 1;
  {
    const std::lock_guard<std::mutex> lock(choices().mutex);
    const auto found = choices().entries.find(key);
    if (found != choices().entries.end()) {
      const CpuGemmChoice& known = found->second;
      if (!(known.health && known.health->stale.load()) ||
          known.measurements >= kMaxMeasurements) {
        return {known.path, known.health};
      }
      measurements = known.measurements + 1;
    }
  }
  std::map<CpuGemmPath, std::vector<double>> fake;
  {
    const std::lock_guard<std::mutex> lock(test_times().mutex);
    fake = test_times().trials;
  }
  // The trials are the library's own business: they do not show in the caller's profiles.
  const at::RecordFunctionGuard not_profiled(false);
  std::vector<std::vector<double>> times(paths.size());
  for (const CpuGemmPath path : paths) trial(path);  // warm-up (reorders, MKL buffers)
  const auto start = Clock::now();
  for (int round = 0; round < kMaxRounds; ++round) {
    for (size_t i = 0; i < paths.size(); ++i) {
      const size_t k = (i + round) % paths.size();
      const auto t0 = Clock::now();
      trial(paths[k]);
      const auto faked = fake.find(paths[k]);
      times[k].push_back(faked == fake.end() || faked->second.empty()
                             ? seconds_since(t0)
                             : faked->second[round % faked->second.size()]);
    }
    if (round + 1 >= kMinRounds && seconds_since(start) > kBudgetSeconds * paths.size()) break;
  }
  CpuGemmChoice choice;
  const size_t chosen = chosen_index(times);  // leaves each times[k]'s median at its middle
  for (size_t k = 0; k < paths.size(); ++k) {
    choice.seconds.emplace_back(paths[k], times[k][times[k].size() / 2]);
  }
  choice.path = paths[chosen];
  choice.measurements = measurements;
  if (key.repeated) {
    choice.health = std::make_shared<ChoiceHealth>();
    choice.health->trial_seconds = choice.seconds[chosen].second;
  }
  const std::lock_guard<std::mutex> lock(choices().mutex);
  CpuGemmChoice& entry = choices().entries[key];
  // Another thread may have measured the same key meanwhile: the later measurement stands.
  entry = std::move(choice);
  return {entry.path, entry.health};
}

// The paths to consider for a GEMM: the forced one where it runs the dtype and shape (else
// ATen), or every path that does, the default first (ATen, or simd with `simd_default`).
std::vector<CpuGemmPath> candidate_paths(at::ScalarType dtype, int64_t rows, bool repeated,
                                         bool transposed = false, bool simd_default = false) {
  const CpuGemmPath forced = forced_path().load();
  if (forced != CpuGemmPath::Auto) {
    const bool ok = supports(forced, dtype) && fits(forced, rows, repeated, transposed);
    return {ok ? forced : CpuGemmPath::Aten};
  }
  std::vector<CpuGemmPath> paths;
  for (const CpuGemmPath path : kPaths) {
    if (supports(path, dtype) && fits(path, rows, repeated, transposed)) paths.push_back(path);
  }
  const auto simd = std::find(paths.begin(), paths.end(), CpuGemmPath::Simd);
  if (simd_default && simd != paths.end()) std::rotate(paths.begin(), simd, simd + 1);
  return paths;
}

// A matrix BLAS can read as is: unit column stride, row stride at least a row.
bool rows_strided(const Tensor& t) {
  return t.stride(1) == 1 && (t.size(0) == 1 || t.stride(0) >= t.size(1));
}

Tensor rows_strided_or_copy(const Tensor& t) { return rows_strided(t) ? t : t.contiguous(); }

// A weight the simd path reads transposed, as stored: unit row stride, its columns stored rows
// (the input gradient's W_ihᵀ, a view of W_ih), and not also rows_strided (a single column).
bool read_transposed(const Tensor& weight) {
  return !rows_strided(weight) && weight.stride(0) == 1 &&
         (weight.size(1) == 1 || weight.stride(1) >= weight.size(0));
}

bool is_cpu_gemm(const Tensor& x) {
  return x.device().is_cpu() && x.size(0) > 0 && x.size(1) > 0;
}

// A weight as contiguous [N, K] rows. The backward's weights are transposed views (W_hhᵀ,
// W_ihᵀ), and ATen copies a transposed matrix element by element down its columns (about 0.5 ms
// for 1 MiB, two per training step at H=256): those are copied in square blocks, each read a
// source row at a time into a small tile and written from it a result row at a time, so that
// both sides touch whole cache lines in order. (Copying a block element by element straight
// across is as slow as ATen when one side's rows are a multiple of 4 KiB apart: at H=256 the
// 32 rows of a block then share one L1 set. Measured on a Zen 4, one thread, 1 MiB: 0.48-0.76 ms
// that way, 0.12 ms through the tile, for both [256, 1024] and [1024, 256].) Split by rows of
// the result; the same bits as any copy.
Tensor contiguous_weight(const Tensor& weight) {
  if (weight.is_contiguous() || weight.dim() != 2 || weight.stride(0) != 1 ||
      !weight.device().is_cpu()) {
    return weight.contiguous();
  }
  Tensor out = at::empty(weight.sizes(), weight.options());
  const int64_t N = weight.size(0), K = weight.size(1), column_stride = weight.stride(1);
  constexpr int64_t kBlock = 32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "contiguous_weight", [&] {
    const scalar_t* src = weight.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, (N + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
      scalar_t tile[kBlock][kBlock];  // tile[j][k]: the block's result rows
      for (int64_t j0 = begin * kBlock; j0 < std::min(N, end * kBlock); j0 += kBlock) {
        const int64_t rows = std::min(kBlock, N - j0);
        for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
          const int64_t columns = std::min(kBlock, K - k0);
          for (int64_t k = 0; k < columns; ++k) {
            const scalar_t* line = src + j0 + (k0 + k) * column_stride;  // contiguous in j
            for (int64_t j = 0; j < rows; ++j) tile[j][k] = line[j];
          }
          for (int64_t j = 0; j < rows; ++j) {
            std::copy(tile[j], tile[j] + columns, dst + (j0 + j) * K + k0);
          }
        }
      }
    });
  });
  return out;
}

// The weight [N, K] (contiguous float32) in the panels of PanelGemm (cpu/small_gemm.h): `groups`
// groups of N / groups rows, each in panels of `lanes` rows stored k-major, zeros past a group's
// end. One pass, split by panels.
Tensor pack_panels(const Tensor& weight, int64_t groups, int64_t lanes) {
  RECORD_FUNCTION("lstm_fused::pack_weight", {});
  const int64_t N = weight.size(0), K = weight.size(1), columns = N / groups;
  const int64_t group_panels = (columns + lanes - 1) / lanes;
  Tensor panels = at::empty({groups * group_panels, K, lanes}, weight.options());
  const float* w = weight.const_data_ptr<float>();
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, groups * group_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t g = panel / group_panels, first = (panel % group_panels) * lanes;
      const int64_t used = std::min(lanes, columns - first);
      float* dst = out + panel * K * lanes;
      for (int64_t lane = 0; lane < used; ++lane) {
        const float* row = w + (g * columns + first + lane) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * lanes + lane] = row[k];
      }
      for (int64_t k = 0; used < lanes && k < K; ++k) {
        std::fill(dst + k * lanes + used, dst + (k + 1) * lanes, 0.f);
      }
    }
  });
  return panels;
}

// The dot form's operands: out [rows, N] (+)= x [rows, K] · weight [N, K]ᵀ, weight rows strided.
DotGemm dot_gemm(const float* x, int64_t x_stride, int64_t rows, const Tensor& weight, float* out,
                 int64_t out_stride, bool accumulate) {
  DotGemm p{};
  p.x = x, p.x_stride = x_stride, p.rows = rows, p.k = weight.size(1);
  p.w = weight.const_data_ptr<float>(), p.w_stride = weight.stride(0), p.n = weight.size(0);
  p.out = out, p.out_stride = out_stride, p.accumulate = accumulate;
  return p;
}

PanelGemm panel_gemm(const float* x, int64_t x_stride, int64_t rows, const Tensor& weight,
                     const Tensor& panels, int64_t groups, float* out, int64_t out_stride,
                     bool accumulate, const Tensor& bias = Tensor()) {
  PanelGemm p{};
  p.x = x, p.x_stride = x_stride, p.rows = rows, p.k = weight.size(1);
  p.panels = panels.const_data_ptr<float>(), p.groups = groups;
  p.group_columns = weight.size(0) / groups;
  p.out = out, p.out_stride = out_stride, p.accumulate = accumulate;
  TORCH_INTERNAL_ASSERT(!(accumulate && bias.defined()));
  p.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  return p;
}

// The transposed kernel, which needs rows to sum and out rows.
void run_transposed(const TransposedGemm& p) {
  TORCH_INTERNAL_ASSERT(p.rows > 0 && p.m > 0 && p.n > 0);
  simd_kernels().transposed(p);
}

// A one-off simd GEMM: out (+)= x·wᵀ, or out = x·wᵀ + bias, float32, x and out with rows_strided
// layouts (bias contiguous): the dot form for few rows (the bias then added after); a weight
// stored transposed, without addend (the input gradient dz·W_ih), by the transposed kernel, which
// reads W_ih's rows as panels (a bias added after); else the weight packed for this call (the
// bias added in the tiles). The route does not depend on the bias: the measured trials run none.
void simd_gemm_into(const Tensor& x, const Tensor& weight, const Tensor& out, bool accumulate,
                    const Tensor& bias = Tensor()) {
  if (x.size(0) <= kSimdDotMaxRows) {
    const Tensor w = rows_strided(weight) ? weight : contiguous_weight(weight);
    simd_kernels().dot(dot_gemm(x.const_data_ptr<float>(), x.stride(0), x.size(0), w,
                                out.data_ptr<float>(), out.stride(0), accumulate));
    if (bias.defined()) out.add_(bias);
    return;
  }
  if (!accumulate && read_transposed(weight)) {
    TransposedGemm p{};
    p.a = x.const_data_ptr<float>(), p.a_stride = x.stride(0), p.a_transposed = true;
    p.m = x.size(0), p.rows = x.size(1);
    p.b = weight.const_data_ptr<float>(), p.b_stride = weight.stride(1), p.n = weight.size(0);
    p.out = out.data_ptr<float>(), p.out_stride = out.stride(0);
    run_transposed(p);
    if (bias.defined()) out.add_(bias);
    return;
  }
  const Tensor w = contiguous_weight(weight);
  simd_kernels().panel(panel_gemm(x.const_data_ptr<float>(), x.stride(0), x.size(0), w,
                                  pack_panels(w, 1, simd_kernels().panel_lanes), 1,
                                  out.data_ptr<float>(), out.stride(0), accumulate, bias));
}

}  // namespace

void run_recurrent_step(const float* h_prev, int64_t h_prev_stride, const Tensor& weight_hh,
                        const ForwardStep& step) {
  RECORD_FUNCTION("lstm_fused::recurrent_step", {});
  simd_kernels().recurrent_step(dot_gemm(h_prev, h_prev_stride, step.rows, weight_hh,
                                         static_cast<float*>(const_cast<void*>(step.z)),
                                         step.z_stride, true),
                                step);
}

namespace {

// ATen's x·wᵀ (+ addend), in place into `out` when accumulating.
void aten_gemm_into(const Tensor& x, const Tensor& weight_t, const Tensor& out, bool accumulate) {
  if (accumulate) {
    out.addmm_(x, weight_t);
  } else {
    Tensor o = out;
    at::mm_out(o, x, weight_t);
  }
}

}  // namespace

bool provide_cpu_gemm_kernels(CpuGemmKernelsSource source) {
  simd_source().store(source);
  return true;
}

// --- Python-visible control (register.cpp exposes these in lstm_fused._C) ---------------------

std::string cpu_gemm_path_name(CpuGemmPath path) {
  switch (path) {
    case CpuGemmPath::Auto:
      return "auto";
    case CpuGemmPath::Aten:
      return "aten";
    case CpuGemmPath::OneDnn:
      return "onednn";
    case CpuGemmPath::Packed:
      return "packed";
    case CpuGemmPath::Simd:
      return "simd";
  }
  return "auto";
}

std::string cpu_gemm_mode() { return cpu_gemm_path_name(forced_path().load()); }

void set_cpu_gemm_mode(c10::string_view mode) {
  const auto parsed = parse_path(mode);
  TORCH_CHECK_VALUE(parsed.has_value(), "lstm_fused: the CPU GEMM mode must be auto, aten, "
                    "onednn, packed or simd, got '", mode, "'");
  forced_path().store(*parsed);
}

std::vector<std::string> cpu_gemm_paths(at::ScalarType dtype) {
  std::vector<std::string> names;
  for (const CpuGemmPath path : kPaths) {
    if (supports(path, dtype)) names.push_back(cpu_gemm_path_name(path));
  }
  return names;
}

std::vector<std::pair<GemmKey, CpuGemmChoice>> cpu_gemm_choices() {
  const std::lock_guard<std::mutex> lock(choices().mutex);
  return {choices().entries.begin(), choices().entries.end()};
}

void clear_cpu_gemm_choices() {
  const std::lock_guard<std::mutex> lock(choices().mutex);
  choices().entries.clear();
}

namespace {
// The forced rows of a projection chunk (0: from the cache size), set_projection_chunk_rows.
std::atomic<int64_t>& forced_chunk_rows() {
  static std::atomic<int64_t> rows{0};
  return rows;
}

// The size of the data cache of `level` that the first CPU sees, as Linux describes it in sysfs
// (read from the CPU's descriptors; glibc's sysconf reports the L3 of the whole package on some
// AMD parts, ten times what a core shares), or `otherwise` where it does not.
int64_t cache_bytes(int level, int64_t otherwise) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), type_file(dir + "/type"), size_file(dir + "/size");
    int found = 0;
    std::string type, size;
    if (!(level_file >> found) || !(type_file >> type) || !(size_file >> size)) break;
    if (found != level || type == "Instruction") continue;
    const int64_t value = std::atoll(size.c_str());
    const char unit = size.empty() ? 0 : size.back();
    const int64_t bytes = unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : value;
    return bytes > 0 ? bytes : otherwise;
  }
  return otherwise;
}

}  // namespace

int64_t projection_chunk_rows(int64_t row_bytes) {
  const int64_t forced = forced_chunk_rows().load();
  if (forced > 0) return forced;
  // Half of what the running threads' L2 caches hold: the other half keeps the recurrent
  // weight (at H=256 each thread's half of W_hh is 512 KiB). Measured on a Zen 4 (1 MiB L2 a
  // core), T=100 B=8..32 I=H=256, under no_grad: 1.02-1.06x nn.LSTM with chunks of 256 or 512
  // rows, 1.09-1.15x with one projection (fresh pages of 3-13 MB written, then read from L3).
  static const int64_t l2 = cache_bytes(2, 1 << 20);
  return std::max<int64_t>(1, l2 * at::get_num_threads() / 2 / std::max<int64_t>(1, row_bytes));
}

int64_t forced_projection_chunk_rows() { return forced_chunk_rows().load(); }

void set_projection_chunk_rows(int64_t rows) {
  TORCH_CHECK_VALUE(rows >= 0, "lstm_fused.cpu_gemm: projection chunk rows must be >= 0 (0: from "
                    "the L2 cache size), got ", rows);
  forced_chunk_rows().store(rows);
}

void set_cpu_gemm_test_times(std::map<CpuGemmPath, std::vector<double>> trials,
                             double run_seconds) {
  const std::lock_guard<std::mutex> lock(test_times().mutex);
  test_times().trials = std::move(trials);
  test_times().run_seconds = run_seconds;
}

// --- one-off GEMMs ---------------------------------------------------------------------------

namespace {
// One-off GEMMs have T*B rows: keyed by the power of two above, so that a new sequence length
// does not measure again.
int64_t rows_bucket(int64_t rows) {
  return int64_t{1} << (64 - __builtin_clzll(static_cast<uint64_t>(rows)));
}
}  // namespace

CpuGemmPath one_off_gemm_path(const Tensor& x, const Tensor& weight, bool accumulate) {
  if (!is_cpu_gemm(x)) return CpuGemmPath::Aten;
  // A weight stored transposed (the input gradient's W_ihᵀ) takes another simd route than a
  // weight as stored (the input projection's W_ih): measured apart, even where the shapes agree.
  GemmKey key{false, rows_bucket(x.size(0)), weight.size(0), weight.size(1), x.scalar_type(),
              at::get_num_threads(), accumulate, weight.size(0)};
  key.weight_transposed = read_transposed(weight);
  Tensor scratch;
  return measured_choice(key, candidate_paths(x.scalar_type(), x.size(0), false),
                         [&](CpuGemmPath p) {
    // Trials compute the real product into a scratch tensor: the operands stay untouched.
    if (p == CpuGemmPath::OneDnn) {
      onednn().unary->call(x.contiguous(), contiguous_weight(weight), std::nullopt, "none",
                           c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    } else if (p == CpuGemmPath::Simd) {
      // The real call's route: operands read in place, an addend accumulated into.
      if (!scratch.defined()) scratch = at::zeros({x.size(0), weight.size(0)}, x.options());
      simd_gemm_into(rows_strided_or_copy(x), weight, scratch, accumulate);
    } else {
      at::mm(x, weight.t());
    }
  }).path;
}

Tensor gemm_nt(const Tensor& x, const Tensor& weight, const OptTensor& bias,
              const OptTensor& addend) {
  const CpuGemmPath path = one_off_gemm_path(x, weight, addend.has_value());
  if (path == CpuGemmPath::Simd) {
    const Tensor xs = rows_strided_or_copy(x);
    const bool in_place = addend && rows_strided(*addend);
    Tensor out = in_place ? *addend : at::empty({x.size(0), weight.size(0)}, x.options());
    // x·wᵀ + b: the bias added in the GEMM's tiles; with an addend, after it.
    simd_gemm_into(xs, weight, out, in_place, addend || !bias ? Tensor() : bias->contiguous());
    if (addend && !in_place) out = addend->add_(out);
    return addend && bias ? out.add_(*bias) : out;
  }
  if (path == CpuGemmPath::OneDnn) {
    const Tensor w = contiguous_weight(weight);
    if (addend) return onednn().binary->call(x.contiguous(), addend->contiguous(), w, bias, "add");
    return onednn().unary->call(x.contiguous(), w, bias, "none",
                              c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  if (!addend) return bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  // In place: an out-of-place addmm would first copy the addend (one more kernel per step).
  addend->addmm_(x, weight.t());
  return bias ? addend->add_(*bias) : *addend;
}

// --- the weight gradients: aᵀ·b --------------------------------------------------------------

namespace {

// aᵀ·b into a new tensor by our transposed kernel: a and b float32 with rows_strided layouts.
Tensor simd_gemm_tn(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty({a.size(1), b.size(1)}, a.options());
  TransposedGemm p{};
  p.a = a.const_data_ptr<float>(), p.a_stride = a.stride(0), p.m = a.size(1);
  p.b = b.const_data_ptr<float>(), p.b_stride = b.stride(0), p.n = b.size(1);
  p.rows = a.size(0), p.out = out.data_ptr<float>(), p.out_stride = out.stride(0);
  run_transposed(p);
  return out;
}

}  // namespace

CpuGemmPath transposed_gemm_path(const Tensor& a, const Tensor& b) {
  if (!is_cpu_gemm(a) || b.size(1) == 0) return CpuGemmPath::Aten;
  // In x·wᵀ terms (x = aᵀ, w = bᵀ): a's columns are the rows, the T*B summed rows are K.
  GemmKey key{false, a.size(1), b.size(1), rows_bucket(a.size(0)), a.scalar_type(),
              at::get_num_threads(), false, b.size(1)};
  key.transposed = true;
  return measured_choice(key, candidate_paths(a.scalar_type(), a.size(1), false, true),
                         [&](CpuGemmPath p) {
    if (p == CpuGemmPath::Simd) {
      simd_gemm_tn(rows_strided_or_copy(a), rows_strided_or_copy(b));
    } else {
      at::mm(a.t(), b);
    }
  }).path;
}

Tensor gemm_tn(const Tensor& a, const Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0));
  if (transposed_gemm_path(a, b) == CpuGemmPath::Simd) {
    return simd_gemm_tn(rows_strided_or_copy(a), rows_strided_or_copy(b));
  }
  return at::mm(a.t(), b);
}

// --- repeated GEMMs: the weight prepared once ------------------------------------------------

RepeatedGemm::RepeatedGemm(const Tensor& weight, int64_t max_rows, int64_t uses, bool accumulate,
                           int64_t out_stride, int64_t column_groups, const Tensor& bias)
    : weight_(contiguous_weight(weight)),
      weight_t_(weight_.t()),
      bias_(bias.defined() ? bias.contiguous() : bias),
      accumulate_(accumulate),
      column_groups_(column_groups) {
  TORCH_INTERNAL_ASSERT(column_groups > 0 && weight.size(0) % column_groups == 0);
  TORCH_INTERNAL_ASSERT(!(accumulate && bias.defined()));
  if (!weight_.device().is_cpu() || max_rows == 0 || weight_.numel() == 0) return;
  const at::ScalarType dtype = weight_.scalar_type();
  const int64_t ldo = std::max(out_stride, weight_.size(0));
  // A bias is an addend like `out` (ATen and MKL add the GEMM to a copy of it).
  GemmKey key{true, max_rows, weight_.size(0), weight_.size(1), dtype,
              at::get_num_threads(), accumulate || bias.defined(), ldo};
  key.column_groups = column_groups_;
  key.weight_as_stored =
      max_rows <= kSimdDotRepeatedMaxRows && max_rows * uses <= kSimdDotMaxRows;
  const std::vector<CpuGemmPath> paths =
      candidate_paths(dtype, max_rows, true, false, column_groups_ > 1);
  if (paths.size() == 1) {
    prepare(paths.front(), max_rows, key.weight_as_stored);
    return;
  }
  // Trials on a [max_rows, K] input of constants into a scratch output (made only when
  // measuring, inside the unprofiled trials); each path prepares its weight once, as a real call
  // would. The chosen path then prepares the weight for this call, measured or not, so every
  // call runs the same operations.
  Tensor x, out;
  std::map<CpuGemmPath, RepeatedGemm> trials;
  const Measured chosen = measured_choice(key, paths, [&](CpuGemmPath p) {
    if (!x.defined()) {
      x = at::full({max_rows, weight_.size(1)}, 0.5, weight_.options());
      out = at::zeros({max_rows, ldo}, weight_.options()).narrow(1, 0, weight_.size(0));
    }
    auto found = trials.find(p);
    if (found == trials.end()) {
      RepeatedGemm trial(weight_, accumulate, column_groups_, bias_);
      trial.prepare(p, max_rows, key.weight_as_stored);
      found = trials.emplace(p, std::move(trial)).first;
    }
    found->second.run(x, out);
  });
  prepare(chosen.path, max_rows, key.weight_as_stored);
  health_ = chosen.health;
  max_rows_ = max_rows;
}

RepeatedGemm::RepeatedGemm(const Tensor& weight, bool accumulate, int64_t column_groups,
                           const Tensor& bias)
    : weight_(weight), weight_t_(weight.t()), bias_(bias), accumulate_(accumulate),
      column_groups_(column_groups) {}

void RepeatedGemm::prepare(CpuGemmPath path, int64_t max_rows, bool weight_as_stored) {
  path_ = path;
  dot_ = path == CpuGemmPath::Simd && weight_as_stored;
  const int64_t N = weight_.size(0), K = weight_.size(1);
  if (path == CpuGemmPath::OneDnn) {
    prepared_ = onednn().reorder->call(weight_, max_rows);
  } else if (path == CpuGemmPath::Simd && !dot_) {
    prepared_ = pack_panels(weight_, column_groups_, simd_kernels().panel_lanes);
  } else if (path == CpuGemmPath::Packed) {
    const MklPacked& mkl = mkl_packed();
    const size_t bytes = mkl.get_size(MklPacked::kBMatrix, static_cast<int>(max_rows),
                                      static_cast<int>(N), static_cast<int>(K));
    prepared_ = at::empty({static_cast<int64_t>(bytes)}, weight_.options().dtype(at::kByte));
    // B = weightᵀ [K, N]: the row-major [N, K] weight read transposed.
    mkl.pack(MklPacked::kRowMajor, MklPacked::kBMatrix, MklPacked::kTrans, static_cast<int>(max_rows),
             static_cast<int>(N), static_cast<int>(K), 1.0f, weight_.const_data_ptr<float>(),
             static_cast<int>(K), static_cast<float*>(prepared_.data_ptr()));
  }
}

void ChoiceHealth::sample(double seconds) {
  {
    const std::lock_guard<std::mutex> lock(test_times().mutex);
    if (test_times().run_seconds >= 0) seconds = test_times().run_seconds;
  }
  if (seconds <= kSlowFactor * trial_seconds) {
    slow_streak.store(0);
  } else if (slow_streak.fetch_add(1) + 1 >= kSlowStreak) {
    stale.store(true);
  }
}

template <typename F>
auto RepeatedGemm::sampled(int64_t rows, const F& gemm) const {
  const bool sample = health_ && rows == max_rows_ && steps_++ > 0 &&
                      health_->calls.fetch_add(1) % kSampleEvery == kSampleEvery - 1;
  if (!sample) return gemm();
  const auto start = Clock::now();
  auto result = gemm();
  health_->sample(seconds_since(start));
  return result;
}

Tensor RepeatedGemm::run(const Tensor& x, const Tensor& out) const {
  if (x.size(0) == 0) return out;
  return sampled(x.size(0), [&] { return compute(x, out); });
}

void RepeatedGemm::run_recurrent_step(const float* h_prev, int64_t h_prev_stride,
                                      const ForwardStep& step) const {
  TORCH_INTERNAL_ASSERT(path_ == CpuGemmPath::Simd);
  sampled(step.rows, [&] {
    if (dot_) {
      lstm_fused::run_recurrent_step(h_prev, h_prev_stride, weight_, step);
      return true;
    }
    float* z = static_cast<float*>(const_cast<void*>(step.z));
    RECORD_FUNCTION("lstm_fused::recurrent_step", {});
    simd_kernels().recurrent_step_panels(panel_gemm(h_prev, h_prev_stride, step.rows, weight_,
                                                    prepared_, column_groups_, z, step.z_stride,
                                                    true),
                                         step);
    return true;
  });
}

Tensor RepeatedGemm::compute(const Tensor& x, const Tensor& out) const {
  // MKL's and ATen's GEMMs add to `out`: a bias is first copied there.
  const bool onto_bias = bias_.defined() && (path_ == CpuGemmPath::Packed ||
                                             path_ == CpuGemmPath::Aten ||
                                             path_ == CpuGemmPath::Auto);
  if (onto_bias) out.copy_(bias_.expand_as(out));
  const bool adds = accumulate_ || onto_bias;
  switch (path_) {
    case CpuGemmPath::Packed: {
      if (!rows_strided(x)) return compute(x.contiguous(), out);
      TORCH_INTERNAL_ASSERT(rows_strided(out));
      const int m = static_cast<int>(x.size(0)), n = static_cast<int>(weight_.size(0)),
                k = static_cast<int>(weight_.size(1));
      mkl_packed().compute(MklPacked::kRowMajor, MklPacked::kNoTrans, MklPacked::kPacked, m, n, k,
                           x.const_data_ptr<float>(), static_cast<int>(x.stride(0)),
                           static_cast<const float*>(prepared_.const_data_ptr()), n,
                           adds ? 1.0f : 0.0f, out.data_ptr<float>(),
                           static_cast<int>(out.stride(0)));
      return out;
    }
    case CpuGemmPath::Simd:
      if (!rows_strided(x)) return compute(x.contiguous(), out);
      TORCH_INTERNAL_ASSERT(rows_strided(out));
      if (dot_) {  // the bias (not with accumulate) added after, as the one-off dot form does
        simd_gemm_into(x, weight_, out, accumulate_, bias_);
        return out;
      }
      simd_kernels().panel(panel_gemm(x.const_data_ptr<float>(), x.stride(0), x.size(0), weight_,
                                      prepared_, column_groups_, out.data_ptr<float>(),
                                      out.stride(0), accumulate_, bias_));
      return out;
    case CpuGemmPath::OneDnn: {
      const OptTensor bias = bias_.defined() ? OptTensor(bias_) : std::nullopt;
      if (accumulate_) return onednn().binary->call(x.contiguous(), out.contiguous(), prepared_,
                                                    bias, "add");
      return onednn().unary->call(x.contiguous(), prepared_, bias, "none",
                                  c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    }
    case CpuGemmPath::Aten:
    case CpuGemmPath::Auto:
      break;
  }
  aten_gemm_into(x, weight_t_, out, adds);
  return out;
}

void RepeatedGemm::run_into(const Tensor& x, const Tensor& out) const {
  const Tensor result = run(x, out);
  if (!result.is_same(out)) out.copy_(result);
}

}  // namespace lstm_fused
