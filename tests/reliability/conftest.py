"""Fixtures the reliability tests share with the package tests (the trainer's small latent shards)."""

from tests.trainer.conftest import trainer_shards  # noqa: F401  (a fixture, registered by importing it)
