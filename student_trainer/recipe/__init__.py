"""The paper's recipe around OPD, one module per command: ``generate`` (teacher rollouts), ``filters``,
``sft`` (the off-policy cold start), ``dedup`` (prompt hygiene), ``probe`` (teacher-aligned prompt
selection) and ``preflight`` (probe + a few OPD steps -> a verdict)."""
