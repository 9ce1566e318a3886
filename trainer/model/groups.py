"""The one rule for spatial vs temporal parameters: by module type (trainer.model.temporal.TEMPORAL_MODULE_TYPES)."""

from __future__ import annotations

from torch import nn

from trainer.model.temporal import TEMPORAL_MODULE_TYPES


def spatial_temporal_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(spatial, temporal) parameters of `model`.

    Temporal: every parameter inside a TemporalTransformer, TemporalConv or FpsEmbedding (the modules an
    image batch skips and SD 2.1 lacks). Spatial: everything else: SD's layers and the I2V image
    projection / decoupled image key-values (they act per frame). Order follows model.parameters().
    """
    temporal_ids = {
        id(p) for m in model.modules() if isinstance(m, TEMPORAL_MODULE_TYPES) for p in m.parameters()
    }
    spatial, temporal = [], []
    for p in model.parameters():
        (temporal if id(p) in temporal_ids else spatial).append(p)
    return spatial, temporal
