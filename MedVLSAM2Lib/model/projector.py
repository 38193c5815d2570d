"""Vision tokens → LLM tokens: the paper's MLP-Mixer (Eq. (2)), and Linear/MLP variants for the Table 6 ablation.

The paper's projector (its Eq. (2), in its order "channel mixing, then token mixing"; LayerNorm + GELU as in
Med3DVLM's ``MixerLayer``, no residuals since the shapes change). For vision tokens ``X`` of shape ``(N, C)``::

    U = MLP_c(LN_C(X))                 channel mixing, per token:  (N, C) → (N, d)
    Z = MLP_t(LN_d(U)ᵀ)ᵀ               token mixing, per channel:  (N, d) → (N', d)
    MLP_a→b(x) = W₂ GELU(W₁ x + b₁) + b₂,   W₁: a → b,  W₂: b → b

At paper scale (``N = 2048`` M3D-CLIP tokens, ``C = 768``, ``d = 2048`` Qwen2.5-3B width, ``N' = 512``) it has
``2·768 + (768·2048 + 2048 + 2048·2048 + 2048) + 2·2048 + (2048·512 + 512 + 512·512 + 512)`` =
``1,536 + 5,771,264 + 4,096 + 1,311,744`` = **7,088,640** parameters: Table 8's 7.09M, and 13.52 MB in bf16
(14,177,280 bytes = 13.52 MiB). Table 8 alone does not fix the order (token mixing first would have 7,086,080,
also "7.09M"); the order is the paper's text. ``mixer_layers=2`` stacks two such layers through ``hidden_tokens ×
hidden_channels`` (the ``tiny`` and ``small`` presets).
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
    """``(B, N, C_vision)`` → ``(B, out_tokens, d_llm)`` through ``config.mixer_layers`` mixer layers (1: Eq. (2))."""

    def __init__(self, config: ProjectorConfig, tokens_in: int, channels_in: int, channels_out: int) -> None:
        super().__init__()
        if config.mixer_layers == 1:
            layers = [MixerLayer(tokens_in, config.out_tokens, channels_in, channels_out)]
        else:
            hidden_tokens = config.hidden_tokens or (tokens_in + config.out_tokens) // 2
            hidden_channels = config.hidden_channels or channels_out // 2
            layers = [
                MixerLayer(tokens_in, hidden_tokens, channels_in, hidden_channels),
                MixerLayer(hidden_tokens, config.out_tokens, hidden_channels, channels_out),
            ]
        self.layers = nn.Sequential(*layers)

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
