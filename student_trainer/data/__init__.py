"""Input data: ``sources`` (a file or a ``datasets`` source: JSONL / JSON / parquet, a dataset directory, a
Hub name, one split of it), ``prompts`` (prompt loading, templates, the seeded resumable stream) and
``records`` (record readers and writers shared by the recipe tools)."""
