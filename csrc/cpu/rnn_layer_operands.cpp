// rnn_layer_operands.h's checks and conversions.
#include "rnn_layer_operands.h"

#include "../rnn_args.h"

namespace seqkern::cpu {

LayerOperands prepare(const std::string& mode_name, const at::Tensor& input,
                      const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                      const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                      const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& w_hr, bool weights_as_given) {
  const RnnMode mode = parse_rnn_mode(mode_name, "rnn_layer");
  const int64_t G = gate_count(mode);
  const LayerDims dims = check_layer_args(G, mode == RnnMode::kLSTM, input, batch_sizes, h0, c0,
                                          w_ih, w_hh, b_ih, b_hh, w_hr);
  const at::ScalarType dt = compute_dtype(input.scalar_type());
  const bool bf16_input = bf16_products_for(input, w_hh, w_hr);
  // bf16_input: x and the weights stay bf16, the operands of bf16 products (pack_right_bf16
  // reads them as they are; an fp32 copy of each weight, rounded back to bf16 when packed, cost
  // about 0.4 ms a call).
  at::Tensor x = bf16_input ? input.reshape({-1, input.size(-1)}).contiguous()
                            : as_compute(input, dt).reshape({-1, input.size(-1)});
  // fp16 / bf16 weights of fp32 products left as given for the caller (weights_as_given):
  // converting both to fp32 is a full pass over each, which a decoding step's products, on
  // weights read in place, do not need.
  const bool as_given = weights_as_given && !bf16_input && dt == at::kFloat &&
                        input.scalar_type() != at::kFloat;
  const auto operand = [&](const at::Tensor& w) {
    return bf16_input || as_given ? w : as_compute(w, dt);
  };
  return {mode, dt, dims.H, dims.P, G, x.size(0), x, operand(w_ih), operand(w_hh),
          w_hr ? as_compute(*w_hr, dt) : at::Tensor(), bf16_input};
}

bool bf16_products_for(const at::Tensor& input, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& w_hr) {
  return input.scalar_type() == at::kBFloat16 && !w_hr && input.dim() > 0 &&
         input.size(-1) % 2 == 0 && w_hh.dim() == 2 && w_hh.size(1) % 2 == 0 &&
         bf16_products_available();
}

}  // namespace seqkern::cpu
