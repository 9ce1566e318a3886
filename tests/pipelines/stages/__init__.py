"""Tests of pipelines/stages."""
