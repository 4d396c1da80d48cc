// group_norm.c as the CPU kernel of the operator lcmserve::group_norm_stats (its schema, with inductor's
// flexible_layout tag, and its fake kernel are defined in group_norm.py), through PyTorch's stable C++
// ABI: under torch.compile's C++ wrapper a C++ operator is called directly, where one written in
// Python would go back through the interpreter on every call.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

extern "C" int lcm_group_norm_stats(const void *x, float *mean, float *rstd, int64_t n, int64_t c, int64_t p,
                                    int64_t groups, const int64_t *xs, float eps, int dtype);

namespace {

using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The step between an image's pixels when they are evenly spaced (whatever the strides of axes of
// size 1), else 0.
int64_t pixel_stride(const Tensor &x) {
  const int64_t h = x.size(2), w = x.size(3);
  if (w == 1) return h == 1 ? 1 : x.stride(2);
  return h == 1 || x.stride(2) == w * x.stride(3) ? x.stride(3) : 0;
}

// Channels contiguous and pixels evenly spaced (NHWC, the layout inductor gives oneDNN's convolutions).
bool channels_last(const Tensor &x) { return (x.size(1) == 1 || x.stride(1) == 1) && pixel_stride(x) != 0; }

std::tuple<Tensor, Tensor> group_norm_stats(Tensor x, int64_t groups, double eps) {
  STD_TORCH_CHECK(x.dim() == 4, "group_norm_stats: x must be [batch, channels, height, width]");
  const int64_t n = x.size(0), c = x.size(1);
  STD_TORCH_CHECK(groups >= 1 && c % groups == 0, "group_norm_stats: groups must divide the ", c,
                  " channels; got ", groups);
  // The op takes any layout (inductor may hand over either); the kernel reads NHWC float32 or bfloat16.
  if (x.scalar_type() != ScalarType::Float && x.scalar_type() != ScalarType::BFloat16)
    x = torch::stable::to(x, ScalarType::Float);
  if (!channels_last(x)) x = torch::stable::contiguous(x, MemoryFormat::ChannelsLast);
  Tensor mean = torch::stable::new_empty(x, std::vector<int64_t>{n, groups}, ScalarType::Float);
  Tensor rstd = torch::stable::new_empty(x, std::vector<int64_t>{n, groups}, ScalarType::Float);
  if (n > 0) {
    const int64_t strides[3] = {x.stride(0), 1, pixel_stride(x)};
    const int status = lcm_group_norm_stats(x.data_ptr(), static_cast<float *>(mean.data_ptr()),
                                            static_cast<float *>(rstd.data_ptr()), n, c, x.size(2) * x.size(3),
                                            groups, strides, static_cast<float>(eps),
                                            x.scalar_type() == ScalarType::BFloat16 ? 1 : 0);
    STD_TORCH_CHECK(status == 0, "group_norm_stats: the kernel failed (status ", status,
                    ": 1 layout or groups it does not take, 2 out of scratch memory)");
  }
  return std::make_tuple(mean, rstd);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lcmserve, CPU, m) { m.impl("group_norm_stats", TORCH_BOX(&group_norm_stats)); }
