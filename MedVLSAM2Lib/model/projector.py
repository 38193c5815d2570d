"""Vision tokens → LLM tokens: the paper's two MLP-Mixer layers, and Linear/MLP variants for the ablation.

A mixer layer (after Med3DVLM's ``MixerLayer``, in the paper's order "channel mixing, then token
mixing"): ``LayerNorm(C) → channel MLP (C_in → C_out, GELU)`` then ``LayerNorm(C_out) → token MLP
(N_in → N_out, GELU)``, no residuals (the shapes change). Two layers take ``2048 × 768`` to
``512 × d_llm`` through ``hidden_tokens × hidden_channels``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ProjectorConfig

__all__ = ["MixerLayer", "MixerProjector", "build_projector"]


def _mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.GELU(), nn.Linear(n_out, n_out))


class MixerLayer(nn.Module):
    """``(B, N_in, C_in)`` → ``(B, N_out, C_out)``: channel mixing, then token mixing."""

    def __init__(self, tokens_in: int, tokens_out: int, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.channel_norm = nn.LayerNorm(channels_in)
        self.channel_mlp = _mlp(channels_in, channels_out)
        self.token_norm = nn.LayerNorm(channels_out)
        self.token_mlp = _mlp(tokens_in, tokens_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_mlp(self.channel_norm(x))  # (B, N_in, C_out)
        x = self.token_norm(x).transpose(1, 2)  # (B, C_out, N_in)
        return self.token_mlp(x).transpose(1, 2)  # (B, N_out, C_out)


class MixerProjector(nn.Module):
    """Two mixer layers: ``(B, N, C_vision)`` → ``(B, out_tokens, d_llm)``."""

    def __init__(self, config: ProjectorConfig, tokens_in: int, channels_in: int, channels_out: int) -> None:
        super().__init__()
        hidden_tokens = config.hidden_tokens or (tokens_in + config.out_tokens) // 2
        hidden_channels = config.hidden_channels or channels_out // 2
        self.layers = nn.Sequential(
            MixerLayer(tokens_in, hidden_tokens, channels_in, hidden_channels),
            MixerLayer(hidden_tokens, config.out_tokens, hidden_channels, channels_out),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)


class ChannelProjector(nn.Module):
    """Ablation variants: a per-token Linear (``linear``) or 2-layer MLP (``mlp``) on channels, then a
    linear token pooling when the token count changes."""

    def __init__(self, config: ProjectorConfig, tokens_in: int, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.channels = (
            nn.Linear(channels_in, channels_out) if config.kind == "linear" else _mlp(channels_in, channels_out)
        )
        self.tokens = nn.Linear(tokens_in, config.out_tokens) if tokens_in != config.out_tokens else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.channels(tokens)
        return self.tokens(x.transpose(1, 2)).transpose(1, 2)


def build_projector(config: ProjectorConfig, tokens_in: int, channels_in: int, channels_out: int) -> nn.Module:
    """The projector named by ``config.kind``."""
    cls = MixerProjector if config.kind == "mixer" else ChannelProjector
    return cls(config, tokens_in, channels_in, channels_out)
