"""Array operations of the isometric block, each behind one function.

XLA:CPU's grouped (depthwise) convolution and, above all, its gradient are several times slower
than the same arithmetic written as shifted copies of the input, and the shifted copies'
kernel gradient is slower again than one pass of a hand-written kernel (docs/design.md,
"Performance on CPU"; measured by `benchmarks/`). TPU and GPU have fast native depthwise
convolutions, so the depthwise convolution takes an `impl` argument that `resolve_conv_impl`
fills in per backend.
"""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from compmod_jax.models import cpu_kernels

# shifted: shifted copies, XLA's gradient. cpu_kernel: the same forward pass and input gradient,
# the kernel gradient in one pass by models/cpu_kernels (CPU only). native: XLA's grouped
# convolution.
CONV_IMPLS = ("shifted", "cpu_kernel", "native")
ACTIVATIONS = {"relu": nn.relu, "hard_swish": nn.hard_swish, "swish": nn.swish}


def resolve_conv_impl(conv_impl):
  """'auto' picks the native grouped convolution on GPU and TPU; on CPU the one-pass kernel
  gradient when it is built and the process has one device (XLA would gather a batch-sharded
  custom call's operands onto every device), else shifted copies."""
  if conv_impl != "auto":
    return conv_impl
  if jax.default_backend() != "cpu":
    return "native"
  return "cpu_kernel" if len(jax.devices()) == 1 and cpu_kernels.available() else "shifted"


def conv_impl_problem(conv_impl):
  """Why `conv_impl` cannot run in this process, or None."""
  if conv_impl == "cpu_kernel" and not cpu_kernels.available():
    return ("conv_impl='cpu_kernel' needs its C++ kernel, which could not be built here (the "
            "log line before says why); use 'auto' or 'shifted'")
  return None


def conv1x1(x, kernel):
  """A 1x1 convolution over NHWC input: a contraction over channels, written as one
  [pixels, C] @ [C, D] matmul. The same sums as an einsum over the 4-D input, but XLA:CPU
  lowers that einsum's kernel gradient (a contraction over N, H and W) by transposing the
  output gradient into [D, pixels] first, a copy that took longer than the matmuls
  (docs/performance.md). A kernel [N, C, D] gives every example its own: one batched matmul
  [N, pixels, C] @ [N, C, D]."""
  if kernel.ndim == 3:
    pixels = x.reshape(x.shape[0], -1, x.shape[-1]) @ kernel
    return pixels.reshape(*x.shape[:-1], kernel.shape[-1])
  pixels = x.reshape(-1, x.shape[-1]) @ kernel
  return pixels.reshape(*x.shape[:-1], kernel.shape[-1])


def patchify_conv(images, kernel, bias):
  """A VALID convolution whose kernel size equals its stride, as one matmul over patches.

  Rows and columns that do not fill a whole patch are dropped, as a VALID convolution does.
  """
  patch = kernel.shape[0]
  n, h, w, c = images.shape
  h_out, w_out = h // patch, w // patch
  x = images[:, : h_out * patch, : w_out * patch]
  x = x.reshape(n, h_out, patch, w_out, patch, c)
  return jnp.einsum("nhpwqc,pqcd->nhwd", x, kernel) + bias


def depthwise_conv3x3(x, kernel, impl):
  """3x3 depthwise convolution, stride 1, SAME padding. x: [N, H, W, C], kernel: [3, 3, C], or
  [N, 3, 3, C] for a kernel per example, which always takes the shifted copies: nine
  elementwise products with a per-example tap, where a grouped convolution would need one
  group per example and channel (slow on CPU and GPU, above all its transpose)."""
  if kernel.ndim == 4:
    taps = jnp.transpose(kernel, (1, 2, 0, 3))[:, :, :, None, None, :]  # [3, 3, N, 1, 1, C]
    return _depthwise_conv3x3_shifted(x, taps)
  if impl == "native":
    return jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
  if impl == "shifted":
    return _depthwise_conv3x3_shifted(x, kernel)
  if impl == "cpu_kernel":
    if jax.default_backend() != "cpu":  # the FFI target is registered for the CPU only
      raise ValueError(f"config.model.conv_impl='cpu_kernel' runs on the CPU only, and this "
                       f"run's backend is {jax.default_backend()}; use 'auto' or 'native'.")
    if x.dtype not in (jnp.float32, jnp.float64):  # the kernel's types
      return _depthwise_conv3x3_shifted(x, kernel)
    return _depthwise_conv3x3_one_pass_grad(x, kernel)
  raise ValueError(f"conv_impl must be one of {CONV_IMPLS} or 'auto', got {impl!r}")


def _shift(x, offset, axis):
  """out[i] = x[i - offset] along `axis`, zero where that index falls outside."""
  size = x.shape[axis]
  zeros = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
  if offset == 1:
    return jnp.concatenate([zeros, jax.lax.slice_in_dim(x, 0, size - 1, axis=axis)], axis=axis)
  return jnp.concatenate([jax.lax.slice_in_dim(x, 1, size, axis=axis), zeros], axis=axis)


def _depthwise_conv3x3_shifted(x, kernel):
  # kernel[i, j] broadcasts against x: [C], or [N, 1, 1, C] for per-example taps.
  # out[h, w] = sum_ij x[h + i - 1, w + j - 1] * kernel[i, j]. Three width-shifted copies are
  # shared by the three kernel rows; each row sum is then shifted along height once. Written
  # for autodiff: XLA:CPU runs its derivative well (unlike _depthwise_conv3x3_windows').
  columns = (_shift(x, 1, axis=2), x, _shift(x, -1, axis=2))
  rows = [sum(col * kernel[i, j] for j, col in enumerate(columns)) for i in range(3)]
  return _shift(rows[0], 1, axis=1) + rows[1] + _shift(rows[2], -1, axis=1)


def _depthwise_conv3x3_windows(x, kernel):
  # The same sums as nine windows of one zero-padded copy, which XLA:CPU fuses into one faster
  # loop. Not differentiated: XLA:CPU runs its autodiff slower than the shifted copies'
  # (both measured in docs/performance.md).
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = [sum(padded[:, i:i + height, j:j + width] * kernel[i, j] for j in range(3))
          for i in range(3)]
  return rows[0] + rows[1] + rows[2]


@jax.custom_vjp
def _depthwise_conv3x3_one_pass_grad(x, kernel):
  return _depthwise_conv3x3_windows(x, kernel)


def _one_pass_fwd(x, kernel):
  return _depthwise_conv3x3_windows(x, kernel), (x, kernel)


def _one_pass_bwd(residuals, dy):
  x, kernel = residuals
  # The input gradient of a correlation is the correlation of dy with the flipped kernel.
  dx = _depthwise_conv3x3_windows(dy, kernel[::-1, ::-1])
  return dx, cpu_kernels.depthwise3x3_kernel_grad(x, dy)


_depthwise_conv3x3_one_pass_grad.defvjp(_one_pass_fwd, _one_pass_bwd)


# Fuse a following ReLU into the batch-norm custom VJP (benchmarks/: measured on CPU). The
# backward pass takes the ReLU mask from the stored output, which the next op keeps alive anyway.
FUSE_BN_RELU = True


def batch_norm_train(x, scale, bias, eps, relu=False):
  """Batch norm over all axes but the last, with batch statistics; optionally followed by ReLU.

  Returns (y, mean, var) with y = relu(BN(x)) when `relu`. The hand-written backward pass
  recomputes what it needs from x instead of storing the normalised input, which saves one
  activation-sized tensor per BN (the step is memory-bound on CPU). mean and var feed only the
  moving averages, never the loss, so their cotangents are ignored.
  """
  return _batch_norm_train(x, scale, bias, eps, bool(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, eps, relu):
  y, mean, var, _ = _batch_norm_forward(x, scale, bias, eps, relu)
  return y, mean, var


def _batch_norm_forward(x, scale, bias, eps, relu):
  # Statistics and normalisation in float32 whatever the compute dtype (a bfloat16 sum of
  # squares over a batch loses the variance); the output goes back to x's dtype.
  axes = tuple(range(x.ndim - 1))
  x32 = at_least_float32(x)
  mean = jnp.mean(x32, axis=axes)
  var = jnp.maximum(jnp.mean(jnp.square(x32), axis=axes) - jnp.square(mean), 0.0)
  inv_std = jax.lax.rsqrt(var + eps)
  y = (x32 - mean) * (inv_std * scale) + bias
  if relu:
    y = jnp.maximum(y, 0.0)
  return y.astype(x.dtype), mean, var, inv_std


def _batch_norm_fwd(x, scale, bias, eps, relu):
  y, mean, var, inv_std = _batch_norm_forward(x, scale, bias, eps, relu)
  return (y, mean, var), (x, y if relu else None, mean, inv_std, scale)


def _batch_norm_bwd(eps, relu, residuals, cotangents):
  del eps
  x, y, mean, inv_std, scale = residuals
  dy = at_least_float32(cotangents[0])
  if relu:
    dy = jnp.where(y > 0, dy, 0.0)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x_hat = (at_least_float32(x) - mean) * inv_std
  dbias = jnp.sum(dy, axis=axes)
  dscale = jnp.sum(dy * x_hat, axis=axes)
  dx = (scale * inv_std) * (dy - (dbias + x_hat * dscale) / count)
  return dx.astype(x.dtype), dscale, dbias


_batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm_eval(x, scale, bias, mean, var, eps):
  """Batch norm with moving statistics (inference), computed in float32, returned in x's
  dtype."""
  y = (at_least_float32(x) - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
  return y.astype(x.dtype)


def at_least_float32(x):
  """x in float32 when it is in a narrower float (bfloat16); float32 and float64 unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
