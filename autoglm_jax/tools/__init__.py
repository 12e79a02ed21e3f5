"""Pre-deployment tools: operator analysis (``autoglm analyze``) and configuration tuning (``autoglm autotune``).

Owns: reading compiled XLA programs (op/fusion/custom-call counts, cost analysis, roofline), the
unfused model variant used to show what the model-level fusions remove, the serving benchmark the
tuner runs per trial, and the tuner itself (search space, strategies, objective, resumable log).
It does not own the engine or the model: it only lowers and runs them.
"""
