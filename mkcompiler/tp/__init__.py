"""Tensor parallelism: the sharding plan (plan.py) and the ranks' runtime (runtime.py)."""
