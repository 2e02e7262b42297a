"""Development kit used by tests, demos, the mini-lab and benchmarks on both sides of the wire.

``tiny_models`` builds tiny Qwen3-shaped models with a real tokenizer (no downloads);
``teacher_process`` runs a real ``teacher-server`` subprocess. It imports neither the server nor the
trainer, so either side (and its tests) can use it without importing the other.
"""
