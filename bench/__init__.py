"""Benchmarks. Job classes the benchmarks submit live in bench/jobs.py."""
