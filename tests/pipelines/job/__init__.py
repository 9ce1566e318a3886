"""Tests of pipelines/job."""
