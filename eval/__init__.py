"""The safety evaluation harness: benchmark loaders (benchmarks.py), generation through sample.py
(generate.py), judges (judges.py), metrics with 95% intervals (metrics.py) and reports (report.py).
Run `python -m eval --help`."""
