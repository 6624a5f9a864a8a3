"""Evaluation: perplexity and KL against dense (``compare``), the needle test, RULER through
lm-evaluation-harness (``ruler``, ``lm_eval_offline``), speed (``bench``, ``bench_serve``) and the
per-op profile (``profile``)."""
