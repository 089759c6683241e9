// A custom autograd function that hands a fused kernel's gradient to autograd as it is.
//
// forward(x, value, grad, scale) multiplies `grad` by `scale` in place and returns a copy of
// `value` (the kernel's per-row losses) whose backward is `∂out[r]/∂x[r] = grad[r]` (unscaled): no surrogate product over [N, V] in the forward
// pass, and in the backward pass, when the upstream gradient is uniformly `scale` (a sum, or a
// mean whose 1/count the caller already folded into `grad`), `grad` itself is returned, so
// AccumulateGrad can adopt the buffer as x.grad without a copy (it does when the graph is not
// retained). Any other upstream gradient gets an out-of-place row-scaled product.
//
// Compiled against the libtorch that torch-sys links (build.rs), called from src/attach.rs.

#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AttachRows : public torch::autograd::Function<AttachRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& value,
                            const at::Tensor& grad, double scale) {
    (void)x;  // only the edge to x matters: its gradient is `grad`
    if (scale != 1.0) {
      // `grad` is the kernel's own fresh buffer: fold the reduction's scale in now, so that the
      // common backward (upstream gradient == scale) returns the buffer untouched.
      grad.mul_(scale);
    }
    ctx->save_for_backward({grad});
    ctx->saved_data["scale"] = scale;
    return value.clone();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    at::Tensor g = saved[0];
    saved.clear();
    const double scale = ctx->saved_data["scale"].toDouble();
    const at::Tensor& go = grad_outputs[0];
    if (!go.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    at::Tensor x_grad;
    const auto s = at::scalar_tensor(scale, go.options());
    if (go.numel() > 0 && go.eq(s).all().item<bool>()) {
      x_grad = std::move(g);
    } else {
      x_grad = g.mul(go.div(s).unsqueeze(-1));
    }
    return {x_grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void write_error(const char* what, char* err, size_t err_len) {
  if (err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

}  // namespace

extern "C" {

// Returns 0 and a new tensor in *out, or 1 with a message in err.
int amend_attach_rows(at::Tensor* x, at::Tensor* value, at::Tensor* grad, double scale,
                      at::Tensor** out, char* err, size_t err_len) {
  try {
    at::Tensor y = AttachRows::apply(*x, *value, *grad, scale);
    *out = new at::Tensor(std::move(y));
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return 1;
  } catch (...) {
    write_error("unknown C++ exception in amend_attach_rows", err, err_len);
    return 1;
  }
}

}  // extern "C"
