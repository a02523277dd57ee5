"""Baselines that need no sliding-window training: ``rtn`` (here) and ``gptq`` (Hessian solver)."""
