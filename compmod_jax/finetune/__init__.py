"""Everything about starting from a checkpoint (docs/fine_tuning.md): the start itself
(init_from), strict loading (pretrained), the new task's initialisation (transfer), added
templates (growth), deltas, and module surgery on a finished run (surgery)."""
