"""The teacher boundary of the trainer.

``client`` (+ ``pool``): the async/sync HTTP client of ``teacher-server`` endpoints (chunking, load balancing,
retries with backoff); ``errors``: its typed errors; ``compat``: the tokenizer/capability checks;
``base``: the :class:`Teacher` a training step talks to, implemented by ``remote`` (the endpoint pool) and
``local`` (an in-process model, needed by the full-vocabulary loss); ``connect``: the teacher a config names.

Nothing is imported here, so ``teacher.errors`` stays cheap to import (the CLI catches its errors).
"""
