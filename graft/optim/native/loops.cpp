// Graft's CPU step in hand-written loops, for the rules whose update is pointwise: SGD,
// Adam / AdamW and AdaGrad (graft/optim/rules, the same math as their `pointwise` form).
//
// One call steps a list of tensors whose rules share their flags and dtype. Per tensor,
// `advance` advances both rules' states and sums the squares of both updates, block by
// block: M's rule, then D's, over the same block of the gradient while it is in cache. It
// returns the norms; Python turns them into the grafting ratio (graft/optim/combine.py:
// the formula lives there alone), and `apply` adds ratio times the update of D (of M
// without a direction), recomputed from the advanced state. That is the least memory
// traffic a grafted step can have without a temporary: adam#sgd reads g, m, v, b and
// writes m, v, b, then reads w, b and writes w.
//
// Each rule declares the names of the scalars and flags it reads (`Names` below); its
// loops read them by name, and Python sends them in that order by name after checking the
// names against the Python rule's (graft/optim/native/__init__.py), so neither side
// depends on the other's order.
//
// Each block's sum of squares is accumulated in double (advance_range), and the blocks'
// sums are added in block order, so the norms do not depend on the number of threads.
// Built by graft/optim/native/__init__.py on first use.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace {

// Values per block: a block of each array a loop touches stays in L2 cache between the
// two rules' loops, and the blocks are many enough to split a large tensor over threads.
constexpr int64_t kBlock = 16384;
constexpr int kMaxStates = 3;

// One rule on one tensor: its arrays, its scalars (a row in the order of its `Names`), the
// sign of the gradient (-1 when maximizing), and its loops.
template <typename T>
struct Side {
  T* param;
  const T* grad;
  T* state[kMaxStates];
  const double* scalars;
  T sign;
  double coeff;  // the update is coeff times the rule's tensor
  double (*advance)(const Side&, int64_t begin, int64_t end);
  void (*apply)(const Side&, T scale, int64_t begin, int64_t end);
};

template <size_t N>
using NameList = std::array<std::string_view, N>;

// The position of `name` in `names`; a name that is not there does not compile.
template <size_t N>
consteval int index_of(const NameList<N>& names, std::string_view name) {
  for (size_t i = 0; i < N; ++i) {
    if (names[i] == name) return int(i);
  }
  throw "not a declared name";  // reached at compile time: a compile error
}

// What a rule's loops read, by name, declared once here: `scalars`, the row Python sends
// per tensor, in this order; `ignored`, the Python rule's scalars these loops do not read;
// `flags`, the compile-time choices, in the order of the rule's template arguments (the
// Python rule's "maximize" flag is passed apart, as the gradient's sign). A rule reads a
// scalar by name, as `scalars[at("name")]`.
template <size_t S, size_t I, size_t F>
struct Names {
  NameList<S> scalars;
  NameList<I> ignored;
  NameList<F> flags;
};

// The gradient a rule sees: negated when maximizing, plus L2 weight decay.
template <bool Decay, typename T>
inline T effective_grad(const Side<T>& side, int64_t i, T weight_decay) {
  T g = side.sign * side.grad[i];
  if constexpr (Decay) {
    g += weight_decay * side.param[i];
  }
  return g;
}

// torch.lerp's formula: start + w (end - start), from the end's side for w >= 0.5.
template <typename T>
inline T lerp(T start, T end, T weight) {
  return std::abs(weight) < T(0.5) ? start + weight * (end - start)
                                   : end - (end - start) * (T(1) - weight);
}

// Each rule: `advance(i)` moves the state at i and returns the rule's tensor there;
// `value(i)` returns it again from the advanced state. Scalars and flags as in
// graft/optim/rules/<rule>.py, by name.

constexpr Names<4, 0, 3> kSGDNames{
    {"coeff", "momentum", "undamped", "weight_decay"}, {}, {"momentum", "nesterov", "decay"}};

template <typename T, bool Momentum, bool Nesterov, bool Decay>
struct SGD {
  static constexpr auto kNames = kSGDNames;
  static consteval int at(std::string_view name) { return index_of(kNames.scalars, name); }
  static constexpr int kStates = Momentum ? 1 : 0;  // momentum_buffer
  static double coeff(const double* s) { return s[at("coeff")]; }

  Side<T> side;
  T momentum, undamped, weight_decay;
  T* buffer;
  explicit SGD(const Side<T>& side)
      : side(side),
        momentum(side.scalars[at("momentum")]),
        undamped(side.scalars[at("undamped")]),
        weight_decay(side.scalars[at("weight_decay")]),
        buffer(side.state[0]) {}

  T advance(int64_t i) const {
    const T g = effective_grad<Decay>(side, i, weight_decay);
    if constexpr (!Momentum) {
      return g;
    } else {
      const T b = buffer[i] * momentum + g * undamped;
      buffer[i] = b;
      return Nesterov ? g + b * momentum : b;
    }
  }
  T value(int64_t i) const {
    if constexpr (!Momentum) {
      return effective_grad<Decay>(side, i, weight_decay);
    } else if constexpr (Nesterov) {
      return effective_grad<Decay>(side, i, weight_decay) + buffer[i] * momentum;
    } else {
      return buffer[i];
    }
  }
};

// `correction` is folded into `coeff` by the Python rule.
constexpr Names<7, 1, 3> kAdamNames{
    {"beta1_weight", "beta2", "beta2_weight", "eps", "coeff", "weight_decay", "decoupled_decay"},
    {"correction"},
    {"amsgrad", "decoupled_decay", "decay"}};

template <typename T, bool Amsgrad, bool Decoupled, bool Decay>
struct Adam {
  static constexpr auto kNames = kAdamNames;
  static consteval int at(std::string_view name) { return index_of(kNames.scalars, name); }
  static constexpr int kStates = Amsgrad ? 3 : 2;  // exp_avg, exp_avg_sq[, max_exp_avg_sq]
  static double coeff(const double* s) {
    return Decoupled ? 1.0 : s[at("coeff")];
  }

  Side<T> side;
  T beta1_weight, beta2, beta2_weight, eps, coeff_, weight_decay, decoupled_decay;
  T *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
  explicit Adam(const Side<T>& side)
      : side(side),
        beta1_weight(side.scalars[at("beta1_weight")]),
        beta2(side.scalars[at("beta2")]),
        beta2_weight(side.scalars[at("beta2_weight")]),
        eps(side.scalars[at("eps")]),
        coeff_(side.scalars[at("coeff")]),
        weight_decay(side.scalars[at("weight_decay")]),
        decoupled_decay(side.scalars[at("decoupled_decay")]),
        exp_avg(side.state[0]),
        exp_avg_sq(side.state[1]),
        max_exp_avg_sq(side.state[2]) {}

  T direction(int64_t i, T m, T v) const {
    const T d = m / (std::sqrt(v) + eps);
    return Decoupled ? d * coeff_ + side.param[i] * decoupled_decay : d;
  }
  T advance(int64_t i) const {
    const T g = effective_grad<Decay>(side, i, weight_decay);
    const T m = lerp(exp_avg[i], g, beta1_weight);
    T v = exp_avg_sq[i] * beta2 + g * g * beta2_weight;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if constexpr (Amsgrad) {
      v = std::max(max_exp_avg_sq[i], v);
      max_exp_avg_sq[i] = v;
    }
    return direction(i, m, v);
  }
  T value(int64_t i) const {
    return direction(i, exp_avg[i], Amsgrad ? max_exp_avg_sq[i] : exp_avg_sq[i]);
  }
};

constexpr Names<4, 0, 2> kAdagradNames{
    {"coeff", "eps", "momentum", "weight_decay"}, {}, {"momentum", "decay"}};

template <typename T, bool Momentum, bool Decay>
struct Adagrad {
  static constexpr auto kNames = kAdagradNames;
  static consteval int at(std::string_view name) { return index_of(kNames.scalars, name); }
  static constexpr int kStates = Momentum ? 2 : 1;  // sum[, momentum_buffer]
  static double coeff(const double* s) { return s[at("coeff")]; }

  Side<T> side;
  T eps, momentum, weight_decay;
  T *sum, *buffer;
  explicit Adagrad(const Side<T>& side)
      : side(side),
        eps(side.scalars[at("eps")]),
        momentum(side.scalars[at("momentum")]),
        weight_decay(side.scalars[at("weight_decay")]),
        sum(side.state[0]),
        buffer(side.state[1]) {}

  T advance(int64_t i) const {
    const T g = effective_grad<Decay>(side, i, weight_decay);
    const T s = sum[i] + g * g;
    sum[i] = s;
    const T d = g / (std::sqrt(s) + eps);
    if constexpr (!Momentum) {
      return d;
    } else {
      const T b = buffer[i] * momentum + d;
      buffer[i] = b;
      return b;
    }
  }
  T value(int64_t i) const {
    if constexpr (Momentum) {
      return buffer[i];
    } else {
      return effective_grad<Decay>(side, i, weight_decay) / (std::sqrt(sum[i]) + eps);
    }
  }
};

// The loops. The rule is a local copy so that its pointers stay in registers; `omp simd`
// vectorizes them (the arrays of one tensor never overlap). Squares are summed in T over
// runs of kRun values (a few additions per vector lane: little rounding) and the runs'
// sums in double: nearly the accuracy of a double sum at the speed of a float one.
constexpr int64_t kRun = 256;

template <typename Rule, typename T>
double advance_range(const Side<T>& side, int64_t begin, int64_t end) {
  const Rule rule(side);
  double sum = 0.0;
  for (int64_t run = begin; run < end; run += kRun) {
    const int64_t stop = std::min(end, run + kRun);
    T partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = run; i < stop; ++i) {
      const T u = rule.advance(i);
      partial += u * u;
    }
    sum += partial;
  }
  return sum;
}

template <typename Rule, typename T>
void apply_range(const Side<T>& side, T scale, int64_t begin, int64_t end) {
  const Rule rule(side);
  T* param = side.param;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    param[i] += scale * rule.value(i);
  }
}

// Calls `bind.template operator()<flags[0], ..., flags[N-1]>()`: runtime flags chosen
// once per call, compile-time flags in the loops.
template <int N, bool... Chosen, typename Bind>
void with_flags(const Bind& bind, const std::vector<bool>& flags) {
  if constexpr (sizeof...(Chosen) == N) {
    bind.template operator()<Chosen...>();
  } else if (flags[sizeof...(Chosen)]) {
    with_flags<N, Chosen..., true>(bind, flags);
  } else {
    with_flags<N, Chosen..., false>(bind, flags);
  }
}

// A side as Python passes it: (rule, flags, maximize, states, scalars). flags: the rule's
// `Names::flags`, in that order; states: each tensor's state arrays in turn; scalars: a
// float64 row per tensor, in the order of `Names::scalars`.
using PySide =
    std::tuple<std::string, std::vector<bool>, bool, std::vector<at::Tensor>, at::Tensor>;

// Everything a side's loops need that is the same for every tensor of the call.
template <typename T>
struct Binding {
  int states = 0;
  int scalars = 0;
  double (*coeff)(const double*) = nullptr;
  double (*advance)(const Side<T>&, int64_t, int64_t) = nullptr;
  void (*apply)(const Side<T>&, T, int64_t, int64_t) = nullptr;

  template <typename Rule>
  void bind() {
    states = Rule::kStates;
    scalars = int(Rule::kNames.scalars.size());
    coeff = &Rule::coeff;
    advance = &advance_range<Rule, T>;
    apply = &apply_range<Rule, T>;
  }
};

template <typename T>
Binding<T> bind_rule(const std::string& rule, const std::vector<bool>& flags) {
  Binding<T> out;
  auto need = [&](size_t count) {
    TORCH_CHECK(flags.size() == count, rule, " takes ", count, " flags, got ", flags.size());
  };
  if (rule == "sgd") {
    need(kSGDNames.flags.size());
    with_flags<3>([&]<bool M, bool N, bool D>() { out.template bind<SGD<T, M, N, D>>(); },
                  flags);
  } else if (rule == "adam") {
    need(kAdamNames.flags.size());
    with_flags<3>([&]<bool A, bool W, bool D>() { out.template bind<Adam<T, A, W, D>>(); },
                  flags);
  } else if (rule == "adagrad") {
    need(kAdagradNames.flags.size());
    with_flags<2>([&]<bool M, bool D>() { out.template bind<Adagrad<T, M, D>>(); }, flags);
  } else {
    TORCH_CHECK(false, "no native loops for rule '", rule, "'");
  }
  return out;
}

void check_like(const at::Tensor& tensor, const at::Tensor& param, const char* what) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == param.scalar_type() &&
                  tensor.is_contiguous() && tensor.numel() == param.numel(),
              what, ": expected a contiguous CPU tensor of ", param.numel(), " values of ",
              param.scalar_type(), ", like its weight");
}

// One role (M or D) over the call's tensors.
template <typename T>
struct Role {
  Binding<T> binding;
  const PySide& py;
  T sign;

  Role(const PySide& py, size_t count) : binding(binding_of(py)), py(py) {
    const auto& [rule, flags, maximize, states, scalars] = py;
    sign = maximize ? T(-1) : T(1);
    TORCH_CHECK(states.size() == count * binding.states, rule, ": ", states.size(),
                " state tensors for ", count, " tensors");
    TORCH_CHECK(scalars.dtype() == at::kDouble && scalars.is_contiguous() &&
                    scalars.dim() == 2 && scalars.size(0) == int64_t(count) &&
                    scalars.size(1) == binding.scalars,
                rule, ": scalars must be contiguous float64 of shape [", count, ", ",
                binding.scalars, "]");
  }
  static Binding<T> binding_of(const PySide& py) {
    return bind_rule<T>(std::get<0>(py), std::get<1>(py));
  }

  Side<T> side(size_t index, const at::Tensor& param, const at::Tensor& grad) const {
    const auto& states = std::get<3>(py);
    Side<T> out{};
    out.param = param.data_ptr<T>();
    out.grad = grad.data_ptr<T>();
    for (int k = 0; k < binding.states; ++k) {
      const at::Tensor& state = states[index * binding.states + k];
      check_like(state, param, "state");
      out.state[k] = state.data_ptr<T>();
    }
    out.scalars = std::get<4>(py).data_ptr<double>() + index * binding.scalars;
    out.sign = sign;
    out.coeff = binding.coeff(out.scalars);
    out.advance = binding.advance;
    out.apply = binding.apply;
    return out;
  }
};

// ‖u‖² of each side over one tensor, advancing the states.
template <typename T>
std::pair<double, double> advance_tensor(const Side<T>& m, const Side<T>* d, int64_t numel) {
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  auto block = [&](int64_t b, double& sum_m, double& sum_d) {
    const int64_t begin = b * kBlock, end = std::min(numel, begin + kBlock);
    sum_m = m.advance(m, begin, end);
    sum_d = d == nullptr ? sum_m : d->advance(*d, begin, end);
  };
  if (blocks <= 1) {
    double sum_m = 0.0, sum_d = 0.0;
    if (blocks == 1) block(0, sum_m, sum_d);
    return {sum_m, sum_d};
  }
  std::vector<double> sums_m(blocks), sums_d(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) block(b, sums_m[b], sums_d[b]);
  });
  double sum_m = 0.0, sum_d = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    sum_m += sums_m[b];
    sum_d += sums_d[b];
  }
  return {sum_m, sum_d};
}

template <typename T>
void apply_tensor(const Side<T>& side, double ratio, int64_t numel) {
  const T scale = static_cast<T>(ratio * side.coeff);
  if (numel <= kBlock) {
    side.apply(side, scale, 0, numel);
    return;
  }
  at::parallel_for(0, numel, kBlock, [&](int64_t begin, int64_t end) {
    side.apply(side, scale, begin, end);
  });
}

void check_lists(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(params.size() == grads.size(), params.size(), " weights but ", grads.size(),
              " gradients");
  TORCH_CHECK(!params.empty(), "no tensors to step");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "native loops take float32 or float64, got ", dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == dtype, "weights of mixed dtypes");
    check_like(params[i], params[i], "weight");
    check_like(grads[i], params[i], "gradient");
  }
}

// Advance both rules' states (M's alone without a direction) over every tensor. Returns
// ‖u_M‖ and ‖u_D‖ per tensor, float64 [n, 2] (‖u_M‖ twice without a direction).
template <typename T>
at::Tensor advance_typed(const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& grads, const PySide& py_m,
                         const std::optional<PySide>& py_d) {
  const size_t count = params.size();
  const Role<T> m(py_m, count);
  std::optional<Role<T>> d;
  if (py_d) d.emplace(*py_d, count);
  at::Tensor norms = at::empty({int64_t(count), 2}, at::kDouble);
  double* out = norms.data_ptr<double>();
  for (size_t i = 0; i < count; ++i) {
    const Side<T> side_m = m.side(i, params[i], grads[i]);
    std::optional<Side<T>> side_d;
    if (d) side_d = d->side(i, params[i], grads[i]);
    const int64_t numel = params[i].numel();
    const auto [sum_m, sum_d] = advance_tensor(side_m, side_d ? &*side_d : nullptr, numel);
    out[2 * i] = std::sqrt(sum_m) * std::abs(side_m.coeff);
    out[2 * i + 1] = side_d ? std::sqrt(sum_d) * std::abs(side_d->coeff) : out[2 * i];
  }
  return norms;
}

at::Tensor advance(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const PySide& m, const std::optional<PySide>& d) {
  check_lists(params, grads);
  if (params[0].scalar_type() == at::kDouble) {
    return advance_typed<double>(params, grads, m, d);
  }
  return advance_typed<float>(params, grads, m, d);
}

// w += ratios[i] · u per tensor, u recomputed from the side's advanced state.
template <typename T>
void apply_typed(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const PySide& py, const double* ratios) {
  const Role<T> role(py, params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    apply_tensor(role.side(i, params[i], grads[i]), ratios[i], params[i].numel());
  }
}

void apply(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
           const PySide& side, const at::Tensor& ratios) {
  check_lists(params, grads);
  TORCH_CHECK(ratios.device().is_cpu() && ratios.dtype() == at::kDouble &&
                  ratios.is_contiguous() && ratios.dim() == 1 &&
                  ratios.size(0) == int64_t(params.size()),
              "ratios must be contiguous float64 of shape [", params.size(), "]");
  const double* values = ratios.data_ptr<double>();
  if (params[0].scalar_type() == at::kDouble) {
    apply_typed<double>(params, grads, side, values);
  } else {
    apply_typed<float>(params, grads, side, values);
  }
}

template <size_t S, size_t I, size_t F>
auto as_lists(const Names<S, I, F>& names) {
  auto list = [](const auto& array) {
    return std::vector<std::string>(array.begin(), array.end());
  };
  return std::make_tuple(list(names.scalars), list(names.ignored), list(names.flags));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("advance", &advance, py::call_guard<py::gil_scoped_release>(),
             "Advance both rules' states over the tensors and return their norms [n, 2].");
  module.def("apply", &apply, py::call_guard<py::gil_scoped_release>(),
             "Add ratios[i] times the side's update, from its advanced state, to tensor i.");
  module.def(
      "names",
      [] {
        return std::map<std::string, decltype(as_lists(kSGDNames))>{
            {"sgd", as_lists(kSGDNames)},
            {"adam", as_lists(kAdamNames)},
            {"adagrad", as_lists(kAdagradNames)}};
      },
      "Per rule: (scalars, ignored scalars, flags), the names the loops read.");
}
