"""Tests of pipelines/tools."""
