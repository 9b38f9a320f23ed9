"""A faster allocator for training on the CPU, without the user installing or exporting
anything.

On the CPU, XLA takes one temporary buffer per execution of the train step (hundreds of MiB for
the digits main job) and gives it back at the end. With glibc's defaults that buffer, and many
smaller ones, are fresh pages from the kernel at every step, which the kernel must zero first.
glibc's tunables fix that, but glibc reads them only when a process starts, so
`python -m compmod_jax.main` (and `compmod`) starts itself again, once, with

  glibc.malloc.hugetlb=1            the heap in transparent huge pages (glibc >= 2.35)
  glibc.malloc.mmap_threshold=32M   buffers up to 32 MiB come from the heap, not from mmap
  glibc.malloc.trim_threshold=1G    freed memory stays in the process for the next step
  glibc.malloc.top_pad=64M          the heap grows in large steps
  glibc.malloc.arena_max=1          one heap for all threads: a buffer larger than a thread's
  glibc.malloc.mmap_max=0           heap (64 MiB) would be mapped and unmapped each time, and
                                    32 MiB is the largest mmap_threshold glibc accepts

`python -m benchmarks.allocator` times the three settings (docs/performance.md has the numbers).
The price is memory: freed memory stays in the process (up to about a gigabyte) for reuse.

Nothing changes where the user chose an allocator (LD_PRELOAD of another malloc, or
GLIBC_TUNABLES set), where the C library is not glibc 2.35 or newer, with
COMPMOD_KEEP_MALLOC=1, or where JAX will run on an accelerator (JAX_PLATFORMS names another
platform first, or a TPU or GPU plugin is installed and JAX_PLATFORMS does not ask for the CPU):
there the step's buffers live on the device, and one heap would serialise the input
pipeline's many threads.
"""
import importlib.util
import os
import platform
import sys

TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_threshold=33554432",
            "glibc.malloc.trim_threshold=1073741824", "glibc.malloc.top_pad=67108864",
            "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0")
# Set in the started-again process, so that it never starts itself a third time.
DONE = "COMPMOD_MALLOC_CHOSEN"
# Where JAX finds TPU and GPU backends: libtpu, and the jax_plugins namespace of the CUDA and
# ROCm plugins.
ACCELERATOR_MODULES = ("libtpu", "jax_plugins")


def accelerator_installed():
  return any(importlib.util.find_spec(name) for name in ACCELERATOR_MODULES)


def runs_on_cpu(environ, has_accelerator):
  """Whether JAX's default backend will be the CPU."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not has_accelerator


def environment(environ, libc=None, has_accelerator=None):
  """The environment to start the command again with, or None to run as it is."""
  if environ.get(DONE) or environ.get("COMPMOD_KEEP_MALLOC") == "1":
    return None
  if "malloc" in environ.get("LD_PRELOAD", "") or environ.get("GLIBC_TUNABLES"):
    return None  # the user's choice
  name, version = libc or platform.libc_ver()
  if name != "glibc" or tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
    return None  # no hugetlb tunable before glibc 2.35
  if has_accelerator is None:
    has_accelerator = accelerator_installed()
  if not runs_on_cpu(environ, has_accelerator):
    return None
  return dict(environ, **{DONE: "1", "GLIBC_TUNABLES": ":".join(TUNABLES)})


def restart_with_fast_malloc():
  """Replaces this process with the same command under glibc's faster settings (see the
  module docstring); returns only when nothing is to change."""
  chosen = environment(os.environ)
  if chosen is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv keeps the interpreter's own options (-X, -u, -m module) and the arguments.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], chosen)
