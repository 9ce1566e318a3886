"""Tests of the dedup step (pipelines.dedup): search core, Ray step, CLI."""
