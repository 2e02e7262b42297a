"""Teacher log-prob microservice for on-policy distillation (FastAPI; transformers or vLLM backend)."""
