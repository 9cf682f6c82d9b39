"""Benchmarks as files: suites (:mod:`.suite`), measurements (:mod:`.measurements`),
provenance (:mod:`.provenance`) and the runner behind ``unspur bench`` (:mod:`.runner`)."""

# Measurements kept in modules of their own register themselves when imported; the
# package imports them (not measurements.py, which they import: no import circle).
from unspur.bench import generated, timings  # noqa: F401
from unspur.bench.measurements import MEASUREMENTS, get_measurement, register
from unspur.bench.runner import run_suite
from unspur.bench.suite import Suite, load_suite

__all__ = ["MEASUREMENTS", "Suite", "get_measurement", "load_suite", "register", "run_suite"]
