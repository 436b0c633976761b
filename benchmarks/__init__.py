"""The benchmarks, as a package: run each one from the repository root as ``python -m benchmarks.<name>``.

Why a package: its modules share ``_common`` (timing protocol, machine record) and ``_arms`` (resumable training
arms) through ordinary imports, so neither a benchmark nor a test has to edit ``sys.path`` to find them.
"""
