"""rlhf_ext microbenchmarks.

``python -m bench <op> [--quick] [--device cpu|cuda] [--csv PATH] [--no-save]`` runs
``bench/bench_<op>.py``; ``python -m bench list`` names the ops; ``python -m bench all``
runs every one. The timing and reporting machinery is in :mod:`bench.harness`; the
peers' implementations (TRL / verl / TorchRL) that the benchmarks and the test suite
compare against are in python_tests/peers.py (shared with the tests). See bench/README.md.
"""
