"""Evaluation helpers that work offline, in three modules with their own dependencies.

* :mod:`hf_lsce.evaluation.metrics`: accuracy, macro-F1, MCC, NLL, ECE, Brier score, reliability bins and
  entity-level scores as NumPy functions (needs NumPy and the core's PyTorch).
* :mod:`hf_lsce.evaluation.calibration`: temperature scaling (needs PyTorch, a core dependency).
* :mod:`hf_lsce.evaluation.evaluate_metrics`: the same metrics as ``evaluate.Metric``s (needs ``evaluate`` and
  ``datasets``: ``pip install "hf-lsce[evaluation]"``).

Import the module you need; this package imports none of them, so each costs only its own dependencies.
"""
