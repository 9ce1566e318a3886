"""`python -m pipelines.dedup OUT_DIR ...`: the same as `latentcrafter dedup` (pipelines.dedup.cli)."""

import sys

from pipelines.dedup.cli import main

sys.exit(main())
