"""The vision tower: a transformers vision encoder reduced to "pixels -> patch features".

Wraps any model `AutoModel` loads (CLIP, Chinese-CLIP, SigLIP vision models, or the vision half of
a dual encoder) and returns the hidden states of one configurable layer, with or without the CLS
token. It does not project, pool or know about the language model — that is the bridge's job.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from seechat.config import VisionConfig


def load_vision_model(path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a vision encoder from a local dir or hub id; a dual encoder yields its vision half."""
    config = AutoConfig.from_pretrained(path)
    if (
        getattr(config, "vision_config", None) is not None
        and getattr(config, "text_config", None) is not None
    ):
        # A full CLIP-style dual encoder: keep only the vision half, as its own model class.
        full = AutoModel.from_pretrained(path, dtype=dtype)
        if isinstance(full.vision_model, PreTrainedModel):  # Chinese-CLIP holds a whole vision model
            return full.vision_model
        vision = AutoModel.from_config(full.config.vision_config, dtype=dtype)
        vision.vision_model.load_state_dict(full.vision_model.state_dict())
        return vision
    return AutoModel.from_pretrained(path, dtype=dtype)


class VisionTower(nn.Module):
    """pixels (B, 3, H, W) -> features (B, N, D_vision) from `feature_layer`."""

    def __init__(self, model: PreTrainedModel, cfg: VisionConfig):
        super().__init__()
        self.model = model
        self.feature_layer = cfg.feature_layer
        self.select = cfg.select
        vc = model.config
        self.hidden_size: int = vc.hidden_size
        self.num_patches: int = (vc.image_size // vc.patch_size) ** 2
        self.image_size: int = vc.image_size
        # How many feature vectors one image yields (patches, plus CLS when kept and present);
        # measured once with a probe image rather than guessed from the class name.
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=self.dtype, device=self.device)
            self.num_features: int = self.forward(probe).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        h = out.hidden_states[self.feature_layer]  # (B, N or N+1, D)
        has_cls = h.shape[1] == self.num_patches + 1  # CLIP / Chinese-CLIP do, SigLIP does not
        if has_cls and self.select == "patch":
            h = h[:, 1:]
        return h
