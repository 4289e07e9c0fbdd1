"""Benchmarks of the whole method (``ippo bench ...``), as opposed to the per-step benchmarks in benchmarks/."""
