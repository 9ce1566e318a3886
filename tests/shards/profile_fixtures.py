"""The same inputs encoded under each storage profile: re-exported from pipelines.tools.profile_shards."""

from __future__ import annotations

from pipelines.tools.profile_shards import STAGE, encode_profile_shards

__all__ = ["STAGE", "encode_profile_shards"]
