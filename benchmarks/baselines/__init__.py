"""The servers the reload matrix compares, and how each one is reloaded.

Used by ``benchmarks/reload_matrix.py``; see ``docs/benchmarks.md``.
"""
