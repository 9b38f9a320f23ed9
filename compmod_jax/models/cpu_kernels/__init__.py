"""Hand-written CPU kernels behind XLA's FFI, built from their C++ source on first use.

XLA:CPU computes the kernel gradient of the 3x3 depthwise convolution as nine shifted
multiply-and-reduce passes off its fast reduction path; `depthwise3x3.cc` does it in one pass
(docs/performance.md has the measurements). The library is compiled with the machine's C++
compiler (`$CXX`, else `c++`) against the FFI headers that ship with jaxlib, once per source,
jax version, compiler and CPU, into `$COMPMOD_KERNEL_CACHE` (default
`~/.cache/compmod_jax/kernels`); the file appears by an atomic rename, so processes that build
it at the same time do not see half a library. Where it cannot be built or loaded (no compiler,
a failed build, a read-only cache), `available()` is False, one log line says why, and the
model falls back to XLA's formulation (models/ops.py). It runs on the CPU backend only.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
from absl import logging
from etils import epath

SOURCE = epath.Path(__file__).parent / "depthwise3x3.cc"
TARGET = "compmod_depthwise3x3_kernel_grad"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
BUILD_TIMEOUT_S = 300


def cache_dir():
  return epath.Path(os.environ.get("COMPMOD_KERNEL_CACHE") or
                    os.path.expanduser("~/.cache/compmod_jax/kernels"))


def _cpu_model():
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      return next((line for line in cpuinfo if line.startswith("model name")), "")
  except OSError:
    return ""


def _library_path(compiler):
  """Where the library built from this source, jax, compiler and CPU lives (-march=native
  code runs only on the CPU it was built for)."""
  key = hashlib.sha256("\n".join([
      SOURCE.read_text(), jax.__version__, compiler, " ".join(FLAGS), platform.machine(),
      _cpu_model()]).encode()).hexdigest()[:16]
  return cache_dir() / f"depthwise3x3-{key}.so"


def _build(compiler, library):
  library.parent.mkdir(parents=True, exist_ok=True)
  handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
  os.close(handle)
  try:
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", partial]
    built = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                           check=False)
    if built.returncode:
      raise RuntimeError(f"{compiler} failed: {built.stderr.strip()[-500:]}")
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def compiler():
  """The C++ compiler's path, or None."""
  return shutil.which(os.environ.get("CXX") or "c++")


@functools.cache
def available():
  """Whether the depthwise kernel gradient is built, loaded and registered with XLA (once per
  process; the first call may compile it, a few seconds). Starts no JAX backend, so it may run
  before jax.distributed.initialize."""
  cxx = compiler()
  try:
    if cxx is None:
      raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'}) on PATH")
    library = _library_path(cxx)
    if not library.exists():
      _build(cxx, library)
    handler = ctypes.cdll.LoadLibrary(str(library))["CompmodDepthwise3x3KernelGrad"]
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as error:
    logging.warning("The one-pass CPU depthwise kernel gradient is unavailable (%s); the "
                    "model uses XLA's shifted-copies gradient, which is slower.", error)
    return False
  return True


def depthwise3x3_kernel_grad(x, dy):
  """dkernel[i, j, c] = sum over n, h, w of x[n, h + i - 1, w + j - 1, c] * dy[n, h, w, c]
  (x zero outside the image): the kernel gradient of a 3x3 depthwise convolution, stride 1,
  SAME padding, NHWC."""
  if not available():
    raise RuntimeError("The CPU depthwise kernel could not be built (the log says why).")
  result = jax.ShapeDtypeStruct((3, 3, x.shape[-1]), x.dtype)
  return jax.ffi.ffi_call(TARGET, result, vmap_method="sequential")(x, dy)
