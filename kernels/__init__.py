"""Triton kernels of pymeta's fused ops (installed as ``pymeta.kernels``).

One file per op, named after it. Importing this package needs Triton; callers go
through ``pymeta.ops``, which only imports it when the Triton backend is usable.
"""
