"""The OPD training machinery: ``trainer`` (the accelerate loop), ``step`` (one step's typed pieces, shared
with the probe), ``batch`` (rollouts + teacher scores as tensors), ``loss_table`` (the losses and what each
needs), ``losses`` and ``metrics`` (pure math), ``chunked`` (log-probs without a [N, V] tensor),
``policy`` (the student as hidden states), ``optim`` and ``checkpoint``."""
