"""Student trainer for on-policy distillation: rollouts, teacher client, OPD losses, metrics, recipe tools."""
