"""A faster allocator for the training command, without the user installing or exporting
anything.

On the CPU a training step frees and allocates activation-sized buffers by the hundred. glibc's
default malloc hands large ones back to the kernel and faults them in again page by page: on
the 2-core development machine the main job spent 366 of its 854 CPU seconds in the kernel, and
one digits step took 0.144 s. glibc's tunables fix that, but glibc reads them only when a
process starts, so `python -m compmod_jax.main` (and `compmod`) starts itself again, once, with

  glibc.malloc.hugetlb=1            the heap in transparent huge pages (glibc >= 2.35)
  glibc.malloc.mmap_threshold=32M   buffers up to 32 MiB come from the heap, not from mmap
  glibc.malloc.trim_threshold=1G    freed memory stays in the process for the next step
  glibc.malloc.top_pad=64M          the heap grows in large steps

(0.099 s a step with huge pages alone, 0.077 s with all four: docs/performance.md). The process
keeps up to about a gigabyte of freed memory for reuse. Nothing changes where the user chose an
allocator (LD_PRELOAD of another malloc, or GLIBC_TUNABLES set), where the C library is not
glibc 2.35 or newer, or with COMPMOD_KEEP_MALLOC=1.
"""
import os
import platform
import sys

TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_threshold=33554432",
            "glibc.malloc.trim_threshold=1073741824", "glibc.malloc.top_pad=67108864")
# Set in the started-again process, so that it never starts itself a third time.
DONE = "COMPMOD_MALLOC_CHOSEN"


def environment(environ, libc=None):
  """The environment to start the command again with, or None to run as it is."""
  if environ.get(DONE) or environ.get("COMPMOD_KEEP_MALLOC") == "1":
    return None
  if "malloc" in environ.get("LD_PRELOAD", "") or environ.get("GLIBC_TUNABLES"):
    return None  # the user's choice
  name, version = libc or platform.libc_ver()
  if name != "glibc" or tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
    return None  # no hugetlb tunable before glibc 2.35
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
