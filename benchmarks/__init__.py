"""Benchmarks of ``messages_async``, each row a ratio against a baseline measured in the same run.

Run ``python -m benchmarks`` (``--quick`` for tiny sizes, ``--only NAME``, ``--markdown``).
Rows live in ``benchmarks/rows/``, one module each, listed in ``benchmarks.rows.ROWS``.
"""
