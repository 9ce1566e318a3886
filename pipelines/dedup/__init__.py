"""Near-duplicate removal that scales: k-means clusters + exact search per cluster (core), as a Ray step."""

from pipelines.dedup.core import SearchConfig, plan_search
from pipelines.dedup.parts import DedupError
from pipelines.dedup.search import exact_duplicates, find_duplicates
from pipelines.dedup.step import run_dedup

__all__ = ["DedupError", "SearchConfig", "exact_duplicates", "find_duplicates", "plan_search", "run_dedup"]
