"""Where a backbone family lets the parameter-efficient policies in: the types its module declares.

A family module may define, next to its presets and layer groups:

* ``adapter_sites(model) -> list[AdapterSite]``: where ``--policy adapter`` puts an ST-Adapter;
* ``probe_tap(model) -> ProbeTap``: the unpooled map ``--policy attentive-probe`` reads;
* ``LORA_TARGETS``: glob patterns over module names ``--policy lora`` adapts by default.

:mod:`vtransfer.policies.peft` reads them through the registry, so the
policies name no backbone; a family without them gets a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterSite:
    """Where one ST-Adapter runs: on the input (``before``) or output (``after``) of a layer group.

    ``layout`` is ``tokens`` (B x (skip + T*N) x D, ViViT) or ``map`` (B x C x T x H x W, CNNs);
    ``skip_tokens`` leading tokens (a CLS token) pass the adapter untouched.
    """

    group: str
    where: str
    channels: int
    layout: str
    skip_tokens: int = 0


@dataclass(frozen=True)
class ProbeTap:
    """Where a family's last map before global pooling is: the module whose output it is, a post op, its width."""

    module: str
    post: str | None
    width: int
