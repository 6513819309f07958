"""Layer-wise learning-rate decay over a backbone's layer groups.

Group ``i`` of ``n`` (input to output, see :mod:`vtransfer.models.base`)
trains at ``lr * decay ** (n - 1 - i)``: the head (the last group) at the
full rate, each group below it ``decay`` times slower than the one above
(BEiT/MAE fine-tuning). For ViViT the groups are the embedding, one per
transformer block and the head, so this is the usual per-block decay. It is
generic over the layer-group contract: for a 3D CNN the groups are its stages
or Inception blocks (I3D's ``Mixed_*``), for a two-stream model whatever its
groups are, and the rule applies to them unchanged. Frozen groups count in
``n`` (the exponent is the distance to the head) but get no parameter group.
"""

from __future__ import annotations

from vtransfer.models.base import VideoBackbone
from vtransfer.run_config import check_layer_decay


def layer_lr_scales(model: VideoBackbone, decay: float) -> dict[str, float]:
    """``{parameter name: decay ** (n_groups - 1 - group index)}`` for every parameter of ``model``."""
    check_layer_decay(decay)
    groups = model.layer_groups()
    last = len(groups) - 1
    return {name: float(decay) ** (last - i) for i, g in enumerate(groups) for name in g.params}


def scales_by_param(model: VideoBackbone, decay: float) -> dict[int, float]:
    """:func:`layer_lr_scales` keyed by ``id(parameter)``, as :func:`vtransfer.engine.trainer.build_optimizer` takes them."""
    params = dict(model.named_parameters())
    return {id(params[name]): scale for name, scale in layer_lr_scales(model, decay).items()}
