"""C++ (CPU) and CUDA sources of pymeta's extension, shipped as package data.

They are compiled on first use by ``pymeta.ops._extension`` (ninja, cached), so the
wheel stays pure Python and never breaks on a new torch ABI.
"""
