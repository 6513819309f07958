"""ST-Adapter: a bottleneck that teaches a frozen network to mix time (Pan et al., NeurIPS 2022).

``x + up(dwconv_t(down(x)))``: a 1x1x1 down-projection to a narrow width, a
depthwise convolution over time only (kernel ``3 x 1 x 1``, zero padding in
time), a 1x1x1 up-projection back, and the residual. The up-projection
starts at zero, so an adapted network computes exactly the pretrained one
until training moves it; the depthwise conv is then the only place the
adapter relates one frame to another. There is no non-linearity, as in the
authors' released code.

Two layouts of the same arithmetic:

* ``map``: a CNN feature map ``B x C x T x H x W`` (I3D, effnet3d);
* ``tokens``: ViViT's spatial-transformer state ``B x T' x S x D``; the
  first ``skip_tokens`` tokens of every time step (the spatial CLS) pass
  through unchanged, as the authors' ViT adapter leaves CLS alone. A
  ``1 x 1`` spatial kernel makes the token order irrelevant, so the
  patches are laid out as a ``T' x N x 1`` volume.
"""

from __future__ import annotations

import torch
from torch import nn

LAYOUTS = ("map", "tokens")
TIME_KERNEL = 3


class STAdapter(nn.Module):
    """Down-projection, depthwise conv over time, zero-initialised up-projection, residual.

    Args:
        channels: channels ``C`` (map) or token width ``D`` (tokens) of the state.
        width: bottleneck width.
        layout: ``"map"`` or ``"tokens"`` (see the module docstring).
        skip_tokens: leading tokens per time step left unchanged (``tokens`` layout).
    """

    def __init__(self, channels: int, width: int, layout: str = "map", skip_tokens: int = 0):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.skip_tokens = int(skip_tokens)
        self.down = nn.Conv3d(channels, width, 1)
        self.conv = nn.Conv3d(width, width, (TIME_KERNEL, 1, 1), padding=(TIME_KERNEL // 2, 0, 0), groups=width)
        self.up = nn.Conv3d(width, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's update of a channels-first ``B x C x T x H x W`` volume."""
        return self.up(self.conv(self.down(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the update, in ``x``'s layout and shape."""
        if self.layout == "map":
            return x + self.delta(x)
        lead, patches = x[:, :, : self.skip_tokens], x[:, :, self.skip_tokens :]
        volume = patches.permute(0, 3, 1, 2).unsqueeze(-1)  # B x D x T' x N x 1
        update = self.delta(volume).squeeze(-1).permute(0, 2, 3, 1)
        return torch.cat([lead, patches + update], dim=2)
