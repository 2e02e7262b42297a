"""Input data: ``prompts`` (prompt files, templates, the seeded resumable stream) and ``records``
(JSONL / parquet readers and writers shared by the recipe tools)."""
