"""Benchmarks as files: suites (:mod:`.suite`), measurements (:mod:`.measurements`),
provenance (:mod:`.provenance`) and the runner behind ``unspur bench`` (:mod:`.runner`)."""

from unspur.bench.measurements import MEASUREMENTS, get_measurement, register
from unspur.bench.runner import run_suite
from unspur.bench.suite import Suite, load_suite

__all__ = ["MEASUREMENTS", "Suite", "get_measurement", "load_suite", "register", "run_suite"]
