// The kernel gradient of a 3x3 depthwise convolution (stride 1, SAME padding, NHWC) in one pass
// over the input and the output gradient, as an XLA FFI custom call for the CPU:
//
//   dkernel[i, j, c] = sum_{n, h, w} x[n, h + i - 1, w + j - 1, c] * dy[n, h, w, c]
//
// (x is zero outside the image). XLA computes this as nine shifted multiply-and-reduce passes
// off its fast reduction path; here each output-gradient row is read once and multiplied with
// the three input rows around it, which are still in cache. Channels are innermost, so the
// inner loop vectorises. Batches are split over threads, each with its own accumulator; the
// partial sums are added in a fixed order, so the result does not depend on scheduling.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
void AccumulateBatches(const T* x, const T* dy, int64_t n_begin, int64_t n_end, int64_t height,
                       int64_t width, int64_t channels, T* acc) {
  const int64_t row = width * channels;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const T* x_image = x + n * height * row;
    const T* dy_image = dy + n * height * row;
    for (int64_t h = 0; h < height; ++h) {
      for (int64_t i = 0; i < 3; ++i) {
        const int64_t source_h = h + i - 1;
        if (source_h < 0 || source_h >= height) continue;
        const T* x_row = x_image + source_h * row;
        const T* dy_row = dy_image + h * row;
        for (int64_t w = 0; w < width; ++w) {
          const T* g = dy_row + w * channels;
          for (int64_t j = 0; j < 3; ++j) {
            const int64_t source_w = w + j - 1;
            if (source_w < 0 || source_w >= width) continue;
            const T* v = x_row + source_w * channels;
            T* a = acc + (i * 3 + j) * channels;
            for (int64_t c = 0; c < channels; ++c) a[c] += v[c] * g[c];
          }
        }
      }
    }
  }
}

template <typename T>
void KernelGrad(const T* x, const T* dy, int64_t batch, int64_t height, int64_t width,
                int64_t channels, T* out) {
  const int64_t taps = 9 * channels;
  // About 64k multiply-adds per thread at least, so small calls stay on the caller's thread.
  const int64_t work = batch * height * width * taps;
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::clamp<int64_t>(work / (1 << 16), 1, std::min(hardware, batch));
  std::vector<T> partial(threads * taps, T(0));
  std::vector<std::thread> workers;
  auto chunk = [&](int64_t t) {
    AccumulateBatches(x, dy, batch * t / threads, batch * (t + 1) / threads, height, width,
                      channels, partial.data() + t * taps);
  };
  for (int64_t t = 1; t < threads; ++t) workers.emplace_back(chunk, t);
  chunk(0);
  for (auto& worker : workers) worker.join();
  std::copy(partial.begin(), partial.begin() + taps, out);
  for (int64_t t = 1; t < threads; ++t) {
    for (int64_t k = 0; k < taps; ++k) out[k] += partial[t * taps + k];
  }
}

ffi::Error DepthwiseKernelGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dkernel) {
  auto dims = x.dimensions();
  if (dims.size() != 4) {
    return ffi::Error::InvalidArgument("depthwise3x3 kernel gradient: x must be NHWC");
  }
  const int64_t batch = dims[0], height = dims[1], width = dims[2], channels = dims[3];
  if (dy.element_count() != x.element_count() ||
      dkernel->element_count() != static_cast<size_t>(9 * channels) ||
      dy.element_type() != x.element_type() || dkernel->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument(
        "depthwise3x3 kernel gradient: dy must match x, and the result must be [3, 3, C]");
  }
  switch (x.element_type()) {
    case ffi::DataType::F32:
      KernelGrad(x.typed_data<float>(), dy.typed_data<float>(), batch, height, width, channels,
                 dkernel->typed_data<float>());
      return ffi::Error::Success();
    case ffi::DataType::F64:
      KernelGrad(x.typed_data<double>(), dy.typed_data<double>(), batch, height, width,
                 channels, dkernel->typed_data<double>());
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "depthwise3x3 kernel gradient: float32 and float64 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CompmodDepthwise3x3KernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
