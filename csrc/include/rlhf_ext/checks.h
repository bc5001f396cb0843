// Argument checks shared by the CPU and CUDA entry points. Every message starts
// with the op's public name and names the argument, what was expected and what
// came, in the manner of flash-attention's CHECK_SHAPE / CHECK_DEVICE.
// TORCH_CHECK_VALUE raises ValueError in Python and TORCH_CHECK_TYPE TypeError.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace rlhf_ext {

// "'a', 'b', 'c'": the names of a table of {name, code} entries, for an error
// message that lists what an argument accepts.
template <typename Table>
std::string quoted_names(const Table& table) {
  std::string names;
  for (const auto& entry : table) {
    names += names.empty() ? "'" : ", '";
    names += entry.name;
    names += "'";
  }
  return names;
}

inline std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": `", name,
                   "` must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": `", name, "` must be on ", like.device(),
                    " like the other inputs, got ", t.device());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": `", name, "` must be ", dim, "-D, got shape ",
                    shape_str(t));
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": `", name, "` must have the shape of `",
                    like_name, "` ", shape_str(like), ", got ", shape_str(t));
}

// A mask is bool or 0/1 of any dtype, with the shape of `like`; returns it as a
// contiguous bool tensor.
inline at::Tensor bool_mask(const char* op, const std::optional<at::Tensor>& mask,
                            const at::Tensor& like, const char* like_name) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  check_same_device(op, "mask", *mask, like);
  check_same_shape(op, "mask", *mask, like, like_name);
  const at::Tensor m = mask->scalar_type() == at::kBool ? *mask : mask->ne(0);
  return m.contiguous();
}

// A per-row vector ([B], e.g. last_value or per-row gamma) as contiguous
// values in `dtype`, or an undefined tensor when absent.
inline at::Tensor row_vector(const char* op, const char* name,
                             const std::optional<at::Tensor>& t, int64_t rows,
                             const at::Tensor& like, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same_device(op, name, *t, like);
  check_floating(op, name, *t);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == rows, op, ": `", name, "` must have shape [",
                    rows, "], got ", shape_str(*t));
  return t->to(dtype).contiguous();
}

// The data of an optional input, or nullptr for a kernel to skip.
template <typename T>
inline const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace rlhf_ext
