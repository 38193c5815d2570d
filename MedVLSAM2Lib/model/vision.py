"""3D ViT with M3D-CLIP geometry, built from MONAI's ViT modules so that M3D-CLIP's
``pretrained_ViT.bin`` loads with its own key names.

MONAI's ``ViT(classification=True)`` returns the classification head's output, not tokens, so the
forward pass (patch embedding → CLS concat → blocks → norm) is run here with the same module names,
and the CLS token is dropped: ``(B, 1, 32, 256, 256)`` → ``(B, 2048, 768)``.
"""

from __future__ import annotations

import torch
from monai.networks.nets import ViT
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig

__all__ = ["VisionEncoder3D"]


class VisionEncoder3D(nn.Module):
    """M3D-CLIP's 3D ViT. State-dict keys equal the M3D-CLIP checkpoint's (138 tensors for ViT-B)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        vit = ViT(
            in_channels=1,
            img_size=config.img_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            proj_type="perceptron",
            classification=True,
            qkv_bias=False,
        )
        self.patch_embedding = vit.patch_embedding
        self.cls_token = vit.cls_token
        self.blocks = vit.blocks
        self.norm = vit.norm
        for block in self.blocks:
            # MONAI >= 1.4 adds an unused cross-attention norm (not in M3D-CLIP's checkpoint) and can use
            # PyTorch's fused scaled-dot-product attention (same maths as its einsum path).
            block.norm_cross_attn = nn.Identity()
            block.attn.use_flash_attention = True

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Encode volumes.

        Args:
            image: ``(B, 1, D, H, W)`` float in ``[0, 1]`` on the model grid.

        Returns:
            ``(B, N, C)`` patch tokens (CLS dropped), ``N = D/4 · H/16 · W/16`` in patch (d, h, w) order.
        """
        tokens = self.patch_embedding(image)  # (B, N, C)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, C)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)[:, 1:]
