"""The benchmarks of metapl: run each as a module from the repository root, ``python -m benchmarks.NAME``.

``benchmarks.harness`` is the one harness (data root, runs through the library, stamps, paired intervals, result
files); ``benchmarks.steps`` builds every timed step from the library. The report: ``benchmarks/README.md``.
"""
