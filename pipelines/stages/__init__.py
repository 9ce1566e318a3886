"""The encode job's stages: one contract, `__init__(config)` loads what it needs, `__call__(batch) -> batch`."""
