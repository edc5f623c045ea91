"""PyTorch re-statement of the MTLFace reference networks, for parity tests only.

Nothing in ``mtlface_jax`` imports this package: torch is an optional extra.
"""
