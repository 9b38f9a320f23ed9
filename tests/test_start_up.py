"""What a command does before it trains: glibc's faster allocator settings (fast_malloc.py) and
the persistent compilation cache (config.compilation_cache_dir)."""
import os
import subprocess
import sys
import textwrap

import pytest

from compmod_jax import cli, experiments, fast_malloc
from compmod_jax.data import streams
from compmod_jax.train import context, start
from helpers import REPO, subprocess_env, tiny_digits

TUNED = ":".join(fast_malloc.TUNABLES)


@pytest.mark.parametrize("environ, libc, has_accelerator, expected", [
    ({}, ("glibc", "2.36"), False, TUNED),
    ({"PATH": "/bin"}, ("glibc", "2.35"), False, TUNED),
    ({}, ("glibc", "2.34"), False, None),                  # no hugetlb tunable yet
    ({}, ("", ""), False, None),                           # musl, macOS: not glibc
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.36"), False, None),  # the user's
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, ("glibc", "2.36"), False, None),
    ({"COMPMOD_KEEP_MALLOC": "1"}, ("glibc", "2.36"), False, None),
    ({fast_malloc.DONE: "1"}, ("glibc", "2.36"), False, None),     # already started again
    ({}, ("glibc", "2.36"), True, None),                   # a TPU or GPU plugin: not the CPU
    ({"JAX_PLATFORMS": "cpu"}, ("glibc", "2.36"), True, TUNED),     # ... unless asked for
    ({"JAX_PLATFORMS": "cuda,cpu"}, ("glibc", "2.36"), False, None),
])
def test_the_allocator_settings_are_chosen_only_where_nobody_chose_and_for_the_cpu(
    environ, libc, has_accelerator, expected):
  chosen = fast_malloc.environment(environ, libc, has_accelerator)
  if expected is None:
    assert chosen is None
  else:
    assert chosen["GLIBC_TUNABLES"] == expected and chosen[fast_malloc.DONE] == "1"
    assert {k: v for k, v in chosen.items() if k in environ} == environ  # nothing else changes


def test_a_command_starts_itself_again_once_with_the_settings_and_its_arguments():
  script = textwrap.dedent("""
      import os, sys
      print("started", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
      from compmod_jax import fast_malloc
      fast_malloc.restart_with_fast_malloc()
      print("running", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
  """)
  env = {k: v for k, v in subprocess_env().items()
         if k not in ("GLIBC_TUNABLES", fast_malloc.DONE, "COMPMOD_KEEP_MALLOC")}
  result = subprocess.run([sys.executable, "-u", "-c", script, "--config=x"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
  assert result.stdout.splitlines() == [
      "started ['--config=x'] None", f"started ['--config=x'] {TUNED}",
      f"running ['--config=x'] {TUNED}"]


def test_the_cache_directory_defaults_to_jax_s_variable_else_a_per_user_folder(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/jax")
  assert experiments.base_config().compilation_cache_dir == "/somewhere/jax"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", "/home/me/.cache")
  assert experiments.base_config().compilation_cache_dir == (
      "/home/me/.cache/compmod_jax/compilation_cache")


def test_an_unusable_cache_directory_is_one_clear_error(tmp_path):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match=r"config\.compilation_cache_dir=.*a_file/cache' cannot "
                                       r"be created .*; give a writable folder, or '' to "
                                       r"compile without a cache"):
    cli.use_compilation_cache(str(tmp_path / "a_file" / "cache"))


def test_a_second_process_reads_the_compiled_step_from_the_cache(tmp_path):
  """Two processes compile the same program with the same cache folder: the first writes it,
  the second reads it back instead of compiling ('' compiles without one)."""
  script = textwrap.dedent("""
      import sys
      import jax, jax.numpy as jnp
      from compmod_jax import cli
      events = []
      jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
      cli.use_compilation_cache(sys.argv[1])
      jax.jit(lambda x: jnp.tanh(x) @ x.T).lower(jnp.ones((64, 64))).compile()
      print(events.count("/jax/compilation_cache/cache_hits"),
            events.count("/jax/compilation_cache/cache_misses"))
  """)
  env = {k: v for k, v in subprocess_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
  runs = [subprocess.run([sys.executable, "-c", script, folder], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
          for folder in (str(tmp_path / "cache"), str(tmp_path / "cache"), "")]
  (first_hits, compiled), (second_hits, second_misses), (hits_without, misses_without) = [
      [int(count) for count in run] for run in runs]
  assert compiled >= 1 and first_hits == 0
  assert (second_hits, second_misses) == (compiled, 0)  # every program read back
  assert (hits_without, misses_without) == (0, 0)  # no cache asked
  assert os.listdir(tmp_path / "cache")


def test_the_model_s_input_and_classes_come_from_metadata_without_reading_a_batch(
    embedded_dir, monkeypatch):
  def no_batch(self):
    raise AssertionError("a batch was read to learn a shape")

  monkeypatch.setattr(streams.DataStream, "__next__", no_batch)
  config = tiny_digits(embedded_dir)
  config.data.image_size = None  # the stored size of the embedded digits: 28 x 28
  config.data.channels = 3
  assert context.input_shape(config) == (28, 28, 3)
  assert context.task_classes(config) == {"mnist": 10}
  config.data.image_size = 32
  ctx = start.make_context(config, "", {})
  state, _ = start.create_train_state(ctx, start.example_images(config))
  assert start.example_images(config).shape == (1, 32, 32, 3)
  assert state.params["input_adapter"]["kernel"].shape[2] == 3  # built for 3 channels
