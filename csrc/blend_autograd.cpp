// Autograd of the blend family, for every device: blend_forward's backward is the blend_backward
// op, itself differentiable (a gradient of a gradient), and the STE passes the gradient through.
// In C++ rather than through torch.library.register_autograd: the Python autograd layer cost as
// much as a 2 MiB blend on CPU. The backward is still the blend_backward op, so torch.compile
// traces it.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace esper_fast::blend {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using BlendForwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         double);
using BlendBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BlendBackwardSignature = BlendBackwardResult(const at::Tensor&, const std::optional<at::Tensor>&,
                                                   const std::optional<at::Tensor>&,
                                                   const std::optional<at::Tensor>&, double, bool, bool, bool);

const c10::TypedOperatorHandle<BlendForwardSignature>& blend_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("esper_fast::blend_forward", "").typed<BlendForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BlendBackwardSignature>& blend_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("esper_fast::blend_backward", "")
                             .typed<BlendBackwardSignature>();
  return op;
}

std::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

class BlendFunction : public torch::autograd::Function<BlendFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& host, const at::Tensor& seed,
                            const std::optional<at::Tensor>& alpha, double alpha_value) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = blend_forward_op().call(host, seed, alpha, alpha_value);
    }
    const bool has_alpha = alpha.has_value() && alpha->defined();
    ctx->saved_data["alpha_value"] = alpha_value;
    ctx->saved_data["has_alpha"] = has_alpha;
    // host and seed are kept only for d_alpha; a float alpha needs nothing saved.
    if (has_alpha && alpha->requires_grad()) {
      ctx->save_for_backward({host, seed, *alpha});
    } else {
      ctx->save_for_backward({at::Tensor(), at::Tensor(), has_alpha ? *alpha : at::Tensor()});
    }
    return out;
  }

  // Through the dispatcher's autograd kernel of blend_backward: with create_graph the gradients
  // are differentiable again (BlendBackwardFunction).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_alpha = ctx->saved_data["has_alpha"].toBool();
    const bool need_host = ctx->needs_input_grad(0), need_seed = ctx->needs_input_grad(1);
    const bool need_alpha = has_alpha && saved[0].defined() && ctx->needs_input_grad(2);
    auto [d_host, d_seed, d_alpha] =
        blend_backward_op().call(grads[0], need_alpha ? as_optional(saved[0]) : std::nullopt,
                                 need_alpha ? as_optional(saved[1]) : std::nullopt, as_optional(saved[2]),
                                 ctx->saved_data["alpha_value"].toDouble(), need_host, need_seed, need_alpha);
    return {need_host ? d_host : at::Tensor(), need_seed ? d_seed : at::Tensor(),
            need_alpha ? d_alpha : at::Tensor(), at::Tensor()};
  }
};

// blend_backward as a differentiable function, so that a gradient of a gradient (a gradient
// penalty through a blend, gradgradcheck) is a real number, not the zero of an op autograd cannot
// see through. With g = grad_out, a the applied alpha, m the clamp's gradient mask and G_host,
// G_seed, G_alpha the gradients arriving for d_host = (1 - a) g, d_seed = a g and
// d_alpha = m sum(g (seed - host)):
//   grad_out: (1 - a) G_host + a G_seed + m G_alpha (seed - host)
//   host: -m G_alpha g      seed: m G_alpha g      alpha: m sum(g (G_seed - G_host))
// each sum over alpha's group. Built from the blend ops (differentiable again) and torch ops.
class BlendBackwardFunction : public torch::autograd::Function<BlendBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const std::optional<at::Tensor>& host,
                               const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& alpha,
                               double alpha_value, bool need_host_grad, bool need_seed_grad, bool need_alpha_grad) {
    BlendBackwardResult out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = blend_backward_op().call(grad_out, host, seed, alpha, alpha_value, need_host_grad, need_seed_grad,
                                     need_alpha_grad);
    }
    ctx->saved_data["alpha_value"] = alpha_value;
    ctx->saved_data["need_host_grad"] = need_host_grad;
    ctx->saved_data["need_seed_grad"] = need_seed_grad;
    ctx->saved_data["need_alpha_grad"] = need_alpha_grad;
    ctx->save_for_backward({grad_out, value_or_undefined(host), value_or_undefined(seed), value_or_undefined(alpha)});
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &host = saved[1], &seed = saved[2], &alpha = saved[3];
    const double alpha_value = ctx->saved_data["alpha_value"].toDouble();
    // Autograd has an edge only for the tensors that were given, in argument order.
    int64_t edge = 0;
    const bool want_grad = ctx->needs_input_grad(edge++);
    const bool want_host = host.defined() && ctx->needs_input_grad(edge++);
    const bool want_seed = seed.defined() && ctx->needs_input_grad(edge++);
    const bool want_alpha = alpha.defined() && ctx->needs_input_grad(edge++);
    // An output that was not asked for is an empty placeholder: whatever reaches it is ignored.
    auto incoming = [&](int i, const char* asked) {
      return ctx->saved_data[asked].toBool() && grads[i].defined() ? grads[i] : at::Tensor();
    };
    const at::Tensor grad_host = incoming(0, "need_host_grad");
    const at::Tensor grad_seed = incoming(1, "need_seed_grad");
    const at::Tensor grad_alpha = incoming(2, "need_alpha_grad");
    const std::optional<at::Tensor> alpha_opt = as_optional(alpha);

    // m G_alpha in the data type, shaped to broadcast over grad_out: [B, 1, ..., 1] per sample,
    // [1, ..., 1] for a single alpha (no numel(): sizes may be symbolic under torch.compile).
    at::Tensor alpha_term;
    if (grad_alpha.defined() && (want_grad || want_host || want_seed)) {
      std::vector<int64_t> shape(g.dim(), 1);
      if (!shape.empty()) shape[0] = -1;
      alpha_term = at::where(at::logical_and(alpha >= 0, alpha <= 1), grad_alpha, 0).to(g.scalar_type()).reshape(shape);
    }
    at::Tensor d_grad, d_host, d_seed, d_alpha;
    auto add = [](const at::Tensor& sum, const at::Tensor& term) { return sum.defined() ? sum + term : term; };
    if (want_grad) {
      if (grad_host.defined()) {
        d_grad = std::get<0>(blend_backward_op().call(grad_host, std::nullopt, std::nullopt, alpha_opt, alpha_value,
                                                      true, false, false));
      }
      if (grad_seed.defined()) {
        d_grad = add(d_grad, std::get<1>(blend_backward_op().call(grad_seed, std::nullopt, std::nullopt, alpha_opt,
                                                                  alpha_value, false, true, false)));
      }
      if (alpha_term.defined()) d_grad = add(d_grad, (seed - host) * alpha_term);
    }
    if (alpha_term.defined()) {
      if (want_host) d_host = -(g * alpha_term);
      if (want_seed) d_seed = g * alpha_term;
    }
    if (want_alpha && (grad_host.defined() || grad_seed.defined())) {
      const at::Tensor zeros = grad_host.defined() && grad_seed.defined() ? at::Tensor() : at::zeros_like(g);
      d_alpha = std::get<2>(blend_backward_op().call(g, grad_host.defined() ? grad_host : zeros,
                                                     grad_seed.defined() ? grad_seed : zeros, alpha_opt, alpha_value,
                                                     false, false, true));
    }
    return {d_grad, d_host, d_seed, d_alpha, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class SteFunction : public torch::autograd::Function<SteFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& host, const at::Tensor& seed) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("esper_fast::ste_forward", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(host, seed);
  }

  // The identity on the incoming gradient: differentiable as it is.
  static variable_list backward(AutogradContext*, variable_list grads) {
    return {grads[0], grads[0]};
  }
};

at::Tensor blend_forward_autograd(const at::Tensor& host, const at::Tensor& seed,
                                  const std::optional<at::Tensor>& alpha, double alpha_value) {
  return BlendFunction::apply(host, seed, alpha, alpha_value);
}

BlendBackwardResult blend_backward_autograd(const at::Tensor& grad_out, const std::optional<at::Tensor>& host,
                                            const std::optional<at::Tensor>& seed,
                                            const std::optional<at::Tensor>& alpha, double alpha_value,
                                            bool need_host_grad, bool need_seed_grad, bool need_alpha_grad) {
  auto requires_grad = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  // The ordinary backward (no create_graph) skips the autograd node.
  if (!at::GradMode::is_enabled() ||
      !(grad_out.requires_grad() || requires_grad(host) || requires_grad(seed) || requires_grad(alpha))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return blend_backward_op().call(grad_out, host, seed, alpha, alpha_value, need_host_grad, need_seed_grad,
                                    need_alpha_grad);
  }
  const variable_list out = BlendBackwardFunction::apply(grad_out, host, seed, alpha, alpha_value, need_host_grad,
                                                         need_seed_grad, need_alpha_grad);
  return {out[0], out[1], out[2]};
}

at::Tensor ste_forward_autograd(const at::Tensor& host, const at::Tensor& seed) {
  return SteFunction::apply(host, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(esper_fast, Autograd, m) {
  m.impl("blend_forward", &blend_forward_autograd);
  m.impl("blend_backward", &blend_backward_autograd);
  m.impl("ste_forward", &ste_forward_autograd);
}

}  // namespace esper_fast::blend
