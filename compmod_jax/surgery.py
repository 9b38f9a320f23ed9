"""Surgery on a trained model's modules (paper §3: a model is a bank of templates plus a few
numbers per task), run on a finished workdir:

  python -m compmod_jax.surgery surgery.harden <workdir> --out=<dir> [--reestimate_bn]
  python -m compmod_jax.surgery surgery.prune <workdir> --keep=<K> --out=<dir> [--reestimate_bn]
      [--refit_steps=<n>]

surgery.harden  Every layer of every task keeps only the template its mixture weights favour most
        (the arg-max of xi_l): the model becomes a fixed signature per task, and the templates
        no hardened signature uses are dropped. <dir> becomes a workdir of that compact model
        (config.model.signature = "explicit", one signature per task; no mixing at
        inference): its checkpoint loads with config.init_from like any run's, and its
        results.json holds the hardened and the mixed test accuracy of each task, the
        parameter counts and the inference step times of both models. --reestimate_bn first
        re-estimates each task's BN moving statistics on its training images (the hardened
        layers compute something else than the mixed ones the statistics were gathered for).
surgery.prune   Keeps the K most used templates (usage: a template's mixture weight summed over every
        layer and task) and drops the others with their columns of the mixture logits, so
        every xi is renormalised over the kept templates (softmax over the remaining columns
        is exactly xi_k / sum of the kept xi). <dir> becomes a workdir of the smaller model
        (config.model.num_templates = K), with the test accuracy of each task before and after
        in results.json; --reestimate_bn as for surgery.harden. --refit_steps=n then trains the pruned
        model's mixture weights and BN (config.trainable="xi_bn"; templates, adapters and
        heads frozen) for n steps of the run's own recipe into <dir>/refit, a normal run that
        starts from <dir> (config.init_from), and adds its accuracies to results.json.

The workdir is only read. <dir> must be new or empty: nothing is ever overwritten.
"""
from absl import flags, logging

from compmod_jax import cli
from compmod_jax.finetune import surgery

COMMANDS = ("harden", "prune")
FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined only when it runs: importing the module defines none)."""
  flags.DEFINE_string("out", None, "New (or empty) directory for the result.")
  flags.DEFINE_bool("reestimate_bn", False, "Re-estimate the BN moving statistics of each task "
                    "on its training images before evaluating.")
  flags.DEFINE_integer("keep", None, "prune: the number of templates to keep.")
  flags.DEFINE_integer("refit_steps", 0, "prune: then train the mixture weights and BN of the "
                       "pruned model for this many steps (0: no re-fit).")
  flags.DEFINE_integer("bn_batches", 50, "Training batches per task for --reestimate_bn.")
  flags.DEFINE_string("data_dir", None, "Where the datasets are, when not where the run read "
                      "them (its config.data.data_dir).")
  flags.DEFINE_integer("timing_repeats", 20, "Forward passes timed per model (median reported).")


def main(argv):
  if len(argv) != 3 or argv[1] not in COMMANDS:
    raise cli.CommandError(f"usage: python -m compmod_jax.surgery {{{'|'.join(COMMANDS)}}} "
                           f"<workdir> --out=<dir> [flags]")
  common = dict(reestimate=FLAGS.reestimate_bn, bn_batches=FLAGS.bn_batches,
                data_dir=FLAGS.data_dir)
  if argv[1] == "harden":
    results = surgery.harden(argv[2], FLAGS.out, timing_repeats=FLAGS.timing_repeats, **common)
  else:
    if FLAGS.keep is None:
      raise cli.CommandError("prune needs --keep=<number of templates to keep>.")
    results = surgery.prune(argv[2], FLAGS.out, keep=FLAGS.keep, refit_steps=FLAGS.refit_steps,
                            **common)
  for task, values in results["tasks"].items():
    before = values.get("mixed_test_accuracy", values.get("unpruned_test_accuracy"))
    refit = results.get("refit", {}).get("tasks", {}).get(task)
    logging.info("%s: test accuracy %.4f after %s%s, %.4f before", task, values["test_accuracy"],
                 argv[1], f" ({refit['test_accuracy']:.4f} re-fitted)" if refit else "", before)


if __name__ == "__main__":
  define_flags()
  cli.run_command("compmod_jax.surgery", main)
