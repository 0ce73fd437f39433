"""Benchmarks of vision-serve (never run by the tests): see bench/README.md."""
