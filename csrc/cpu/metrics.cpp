// metrics_update and metrics_update_stacked on CPU: rows split over at::parallel_for, per-thread
// partials merged once; a stacked update runs each configuration's rows in turn.
// float32/float16/bfloat16 rows run three AVX2 sweeps over the (cache-resident) row: max,
// first index of the max, sum of exp(x - max); other machines and short rows use scalar code.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ESPER_FAST_X86 1
#define ESPER_FAST_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#include "metrics_args.h"

namespace esper_fast {
namespace metrics {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// What one row contributes: torch.argmax's index and, when asked, lse - logit[target].
struct RowResult {
  int64_t argmax;
  double loss;
};

template <typename scalar_t>
inline float to_float(scalar_t v) {
  return static_cast<float>(v);
}
inline double to_float(double v) {
  return v;
}

// torch.argmax order: the first NaN, else the first maximum.
template <typename scalar_t>
RowResult row_scalar(const scalar_t* x, int64_t classes, int64_t target, bool want_loss) {
  using math_t = decltype(to_float(x[0]));
  math_t best = to_float(x[0]);
  int64_t best_index = 0;
  for (int64_t i = 1; i < classes && !std::isnan(best); ++i) {
    const math_t v = to_float(x[i]);
    if (v > best || std::isnan(v)) {
      best = v;
      best_index = i;
    }
  }
  RowResult result{best_index, kNaN};
  // A NaN, +inf or all -inf row has a NaN loss, as log_softmax gives it.
  if (!want_loss || std::isnan(best) || std::isinf(best)) return result;
  math_t sum = 0;
  for (int64_t i = 0; i < classes; ++i) sum += std::exp(to_float(x[i]) - best);
  result.loss = (static_cast<double>(best) - static_cast<double>(to_float(x[target]))) + std::log(static_cast<double>(sum));
  return result;
}

#ifdef ESPER_FAST_X86

template <typename scalar_t>
ESPER_FAST_AVX2 inline __m256 load8(const scalar_t* p);

template <>
ESPER_FAST_AVX2 inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
ESPER_FAST_AVX2 inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
ESPER_FAST_AVX2 inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// exp for x <= 0 (Cephes polynomial, ~1 ulp); inputs below -87.3 flush to 0.
ESPER_FAST_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, x), x, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

ESPER_FAST_AVX2 inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

ESPER_FAST_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <typename scalar_t>
ESPER_FAST_AVX2 RowResult row_avx2(const scalar_t* x, int64_t classes, int64_t target, bool want_loss) {
  const int64_t body = classes - classes % 8;
  // Sweep 1: the maximum ignoring NaN (max_ps keeps its second operand on NaN), and whether a NaN exists.
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan_seen = _mm256_setzero_ps();
  for (int64_t i = 0; i < body; i += 8) {
    const __m256 v = load8(x + i);
    nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(v, vmax);
  }
  float best = horizontal_max(vmax);
  bool has_nan = _mm256_movemask_ps(nan_seen) != 0;
  for (int64_t i = body; i < classes; ++i) {
    const float v = static_cast<float>(x[i]);
    has_nan |= std::isnan(v);
    best = v > best ? v : best;
  }
  if (has_nan) {
    int64_t i = 0;
    while (!std::isnan(static_cast<float>(x[i]))) ++i;
    return {i, kNaN};
  }
  // Sweep 2: the first index holding the maximum.
  int64_t best_index = -1;
  const __m256 vbest = _mm256_set1_ps(best);
  for (int64_t i = 0; i < body && best_index < 0; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(load8(x + i), vbest, _CMP_EQ_OQ));
    if (mask != 0) best_index = i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (int64_t i = body; i < classes && best_index < 0; ++i) {
    if (static_cast<float>(x[i]) == best) best_index = i;
  }
  RowResult result{best_index, kNaN};
  if (!want_loss || std::isinf(best)) return result;
  // Sweep 3: sum of exp(x - max), four accumulators to hide the FMA latency.
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t body32 = classes - classes % 32;
  for (int64_t i = 0; i < body32; i += 32) {
    for (int k = 0; k < 4; ++k) {
      acc[k] = _mm256_add_ps(acc[k], exp_nonpositive(_mm256_sub_ps(load8(x + i + 8 * k), vbest)));
    }
  }
  for (int64_t i = body32; i < body; i += 8) {
    acc[0] = _mm256_add_ps(acc[0], exp_nonpositive(_mm256_sub_ps(load8(x + i), vbest)));
  }
  double sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (int64_t i = body; i < classes; ++i) sum += std::exp(static_cast<double>(static_cast<float>(x[i]) - best));
  result.loss = (static_cast<double>(best) - static_cast<double>(static_cast<float>(x[target]))) + std::log(sum);
  return result;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");

#endif  // ESPER_FAST_X86

template <typename scalar_t>
inline RowResult row_metrics(const scalar_t* x, int64_t classes, int64_t target, bool want_loss) {
#ifdef ESPER_FAST_X86
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (kHasAvx2 && classes >= 16) return row_avx2(x, classes, target, want_loss);
  }
#endif
  return row_scalar(x, classes, target, want_loss);
}

struct Partial {
  double loss = 0.0;
  int64_t valid = 0;
  int64_t correct = 0;
  int64_t errors = 0;
  int64_t first_bad_row = std::numeric_limits<int64_t>::max();
  int64_t bad_value = 0;
  std::vector<int64_t> class_counts;  // class_total[C] then class_correct[C]
};

inline double load_double(const int64_t* slot) {
  double v;
  std::memcpy(&v, slot, sizeof(v));
  return v;
}
inline void store_double(int64_t* slot, double v) {
  std::memcpy(slot, &v, sizeof(v));
}

// One configuration's batch: logits [rows, classes] at `logit_ptr`, added into the state at `s`.
// `given_loss`, when set, is the batch's loss from another criterion and is added as it is;
// otherwise the batch's mean cross-entropy over its non-ignored rows is.
template <typename scalar_t>
void update_one(const scalar_t* logit_ptr, const int64_t* target_ptr, int64_t rows, int64_t classes, bool per_class,
                const c10::optional<double>& given_loss, int64_t ignore_index, int64_t* s) {
  const bool want_loss = !given_loss.has_value();
  std::vector<Partial> partials(at::get_num_threads());
  for (auto& p : partials) {
    if (per_class) p.class_counts.assign(2 * classes, 0);
  }
  // Enough rows per task that the split pays for itself on short rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / classes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Partial& p = partials[at::get_thread_num()];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t target = target_ptr[row];
      const bool ignored = target == ignore_index;
      if (target < 0 || target >= classes) {
        if (!ignored && row < p.first_bad_row) {
          p.first_bad_row = row;
          p.bad_value = target;
        }
        p.errors += !ignored;
        continue;
      }
      // An in-range ignore_index still counts for accuracy, as argmax == labels does.
      const RowResult r = row_metrics(logit_ptr + row * classes, classes, target, want_loss && !ignored);
      const bool hit = r.argmax == target;
      if (!ignored) {
        p.loss += r.loss;
        p.valid += 1;
      }
      p.correct += hit;
      if (per_class) {
        p.class_counts[target] += 1;
        p.class_counts[classes + target] += hit;
      }
    }
  });

  Partial total;
  for (const auto& p : partials) {
    total.loss += p.loss;
    total.valid += p.valid;
    total.correct += p.correct;
    total.errors += p.errors;
    if (p.first_bad_row < total.first_bad_row) {
      total.first_bad_row = p.first_bad_row;
      total.bad_value = p.bad_value;
    }
  }
  const double batch_mean = want_loss ? total.loss / static_cast<double>(total.valid) : *given_loss;
  store_double(s + kLossSum, load_double(s + kLossSum) + batch_mean);
  s[kBatches] += 1;
  s[kCorrect] += total.correct;
  s[kTotal] += rows;
  if (total.errors > 0 && s[kErrors] == 0) s[kBadValue] = total.bad_value;
  s[kErrors] += total.errors;
  if (per_class) {
    for (const auto& p : partials) {
      for (int64_t i = 0; i < 2 * classes; ++i) s[kHeader + i] += p.class_counts[i];
    }
  }
}

// Configuration k of a stacked update is rows [k * rows, (k + 1) * rows) and state row k: the
// same pass, with the same split into tasks, as a metrics_update of its rows alone.
void update_configs(const at::Tensor& logits, const at::Tensor& targets, const c10::optional<double>& given_loss,
                    at::Tensor& state, int64_t ignore_index, const UpdateShape& shape) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "metrics_update_cpu", [&] {
    const scalar_t* logit_ptr = logits.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < shape.configs; ++k) {
      update_one(logit_ptr + k * shape.rows * shape.classes, targets.const_data_ptr<int64_t>(), shape.rows,
                 shape.classes, shape.per_class, given_loss, ignore_index,
                 state.mutable_data_ptr<int64_t>() + k * shape.width);
    }
  });
}

void metrics_update_cpu(const at::Tensor& logits, const at::Tensor& targets, const c10::optional<at::Tensor>& batch_loss,
                        at::Tensor& state, int64_t ignore_index) {
  const UpdateShape shape = check_update_args("metrics_update", logits, targets, batch_loss, state, false);
  c10::optional<double> given_loss;
  if (batch_loss.has_value()) given_loss = batch_loss->to(at::kDouble).reshape({}).item<double>();
  update_configs(logits, targets, given_loss, state, ignore_index, shape);
}

void metrics_update_stacked_cpu(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& state,
                                int64_t ignore_index) {
  const UpdateShape shape = check_update_args("metrics_update_stacked", logits, targets, c10::nullopt, state, true);
  update_configs(logits, targets, c10::nullopt, state, ignore_index, shape);
}

}  // namespace
}  // namespace metrics
}  // namespace esper_fast

TORCH_LIBRARY_IMPL(esper_fast, CPU, m) {
  m.impl("metrics_update", &esper_fast::metrics::metrics_update_cpu);
  m.impl("metrics_update_stacked", &esper_fast::metrics::metrics_update_stacked_cpu);
}
