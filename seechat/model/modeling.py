"""SeeChatModel: vision tower + bridge + language model, composed.

The whole forward pass, top to bottom:

    pixels (n_img, 3, H, W) --vision_tower--> (n_img, N_patch, D_v)
                            --bridge-------> (n_img, N_tok, D_lm)
    input_ids (B, T) --LM embeddings--> (B, T, D_lm); the n_img * N_tok image-token positions are
    overwritten in order by the image features (`masked_scatter`, after a count check);
    --language_model--> logits (B, T, V); loss = cross-entropy over labels != -100, summed (each
    token weighted by `loss_weights`, default 1) and divided by `num_items_in_batch` (default: the
    weighted count), i.e. a token mean unless training asks for another average (seechat.train.averaging).
    A padding-free batch (B = 1, the samples end to end, `cu_seq_lens` at their boundaries) runs the
    same pass over only its real tokens; the LM's varlen attention keeps the samples apart
    (seechat.model.varlen).
    With `model.fusion: deep` the LM call runs inside `visual_experts.routing(image mask)`: at image
    positions every layer uses its visual expert's QKV and MLP (seechat.model.fusion); a text-only
    input never opens the scope, so it gets exactly the base LM's computation.

Building from base experts lives in `seechat.model.build`, checkpoints in `seechat.model.checkpoint`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from seechat.config import ModelConfig
from seechat.data.conversation import IGNORE_INDEX, NoSupervisedTokensError
from seechat.model.fused_loss import fused_head, head_cross_entropy, supervised_tokens
from seechat.model.fusion import VisualExperts
from seechat.model.varlen import varlen_kwargs
from seechat.model.vision import VisionTower


@dataclass
class SeeChatOutput:
    logits: torch.Tensor | None  # (B, T, V); None when the forward was asked for the loss only
    loss: torch.Tensor | None = None  # scalar
    cache: object | None = None  # the LM's KV cache when use_cache
    num_items: int = 0  # supervised tokens in this batch


class SeeChatModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vision_tower: VisionTower,
        bridge: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        visual_experts: VisualExperts | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = vision_tower
        self.bridge = bridge
        self.language_model = language_model
        self.visual_experts = visual_experts  # None for shallow fusion
        self.image_token_id = image_token_id
        # Where each part's weights come from when saving: "base" (cfg path), "full" or "lora".
        self.provenance: dict[str, str] = {"vision": "base", "lm": "base"}
        # The loss-only forward fuses the LM head with its cross-entropy where the LM allows it
        # (seechat.model.fused_loss; `train.fused_loss` sets it for a run).
        self.fused_loss = True

    @property
    def num_image_tokens(self) -> int:
        return self.bridge.num_tokens

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_img, 3, H, W) -> (n_img, N_tok, D_lm) in the LM's dtype."""
        feats = self.vision_tower(pixel_values)
        feats = feats.to(next(self.bridge.parameters()).dtype)
        return self.bridge(feats).to(self.language_model.get_input_embeddings().weight.dtype)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features scattered into the image-token positions. (B, T, D)"""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id  # (B, T)
        n_slots = int(mask.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"image token count mismatch: the text has {n_slots} image tokens but the images give "
                f"{n_feats} features ({0 if image_features is None else image_features.shape[0]} image(s) x "
                f"{self.num_image_tokens} tokens); each <image> marker must be expanded by the processor"
            )
        if n_feats:
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        cache: object | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        num_items_in_batch: float | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        loss_weights: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_seq_len: int = 0,
    ) -> SeeChatOutput:
        """`num_items_in_batch`: divide the summed loss by this (gradient accumulation and data
        parallelism pass the global count so the mean is over the true global batch).
        `loss_weights` (B, T), aligned with `labels`: the supervised token at label position t counts
        `loss_weights[b, t]` times in the sum (per-sample or square averaging; None = every token once).
        `cu_seq_lens` (S + 1,), `max_seq_len`: a padding-free batch (seechat.data.collate): one row of
        S sequences end to end, with `position_ids` restarting at each. Every attention keeps them
        apart (transformers reads the restarts as a block-diagonal mask); the LM runs it without
        the (N, N) mask after seechat.model.varlen.use_varlen_attention.
        `logits_to_keep`: compute logits for only the last k positions (0 = all), as in decoding.
        `return_logits=False` (training, with `labels`): the LM head runs only at positions that
        predict a supervised token, and no logits are returned. Same loss; with a 150 k vocabulary
        the (B, T, V) fp32 logits of image and prompt positions are most of a stage-1 step's memory.
        Where the LM allows it (`self.fused_loss`, seechat.model.fused_loss), the head and the loss
        run fused, chunk by chunk, so even the supervised positions' logits are never held whole."""
        varlen = {}
        if cu_seq_lens is not None:
            self._check_padding_free(input_ids, attention_mask, position_ids)
            varlen = varlen_kwargs(cu_seq_lens, max_seq_len)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, image_features)
        fusion = (
            nullcontext()
            if self.visual_experts is None
            else self.visual_experts.routing(input_ids == self.image_token_id)
        )
        fusable = labels is not None and not return_logits and cache is None and not use_cache
        head = self.loss_head() if fusable else None
        if head is not None:  # the loss without the (K, V) logits
            with fusion:
                hidden = self.language_model.get_decoder()(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                    **varlen,
                ).last_hidden_state  # (B, T, D)
            hidden, targets, weights = supervised_tokens(hidden, labels, loss_weights)
            n = check_supervised(targets)
            loss = head_cross_entropy(hidden, head, targets, weights) / (num_items_in_batch or weights.sum())
            return SeeChatOutput(logits=None, loss=loss, num_items=n)
        keep: int | torch.Tensor = logits_to_keep
        if labels is not None and not return_logits:
            keep = supervised_positions(labels)  # (K,) positions whose next token is supervised
        with fusion:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                logits_to_keep=keep,
                **varlen,
            )
        if labels is None:
            return SeeChatOutput(logits=out.logits, cache=out.cache)
        if return_logits:
            loss, n = causal_lm_loss(out.logits, labels, num_items_in_batch, loss_weights)
            return SeeChatOutput(logits=out.logits, loss=loss, cache=out.cache, num_items=n)
        weights = None if loss_weights is None else loss_weights[:, keep + 1]
        loss, n = token_loss(out.logits, labels[:, keep + 1], num_items_in_batch, weights)
        return SeeChatOutput(logits=None, loss=loss, cache=out.cache, num_items=n)

    def loss_head(self) -> nn.Linear | None:
        """The LM head to fuse with the loss, or None when the loss goes through the LM's logits."""
        head = fused_head(self.language_model) if self.fused_loss else None
        # a head that FSDP shards as its own unit holds only its shard outside its forward
        return None if head is None or isinstance(head.weight, DTensor) else head

    @staticmethod
    def _check_padding_free(
        input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> None:
        """A padding-free batch is one unpadded row whose position ids restart at each sequence."""
        if input_ids.shape[0] != 1 or attention_mask is not None or position_ids is None:
            raise ValueError("a padding-free batch is one row with position_ids and no attention_mask")


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t (any row) whose next label is supervised: the only logits the loss reads. (K,)"""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def check_supervised(targets: torch.Tensor) -> int:
    """The number of supervised targets (!= -100); an error when there are none."""
    n = int((targets != IGNORE_INDEX).sum())
    if n == 0:
        raise NoSupervisedTokensError(
            "this batch has no supervised token (every label is -100): the loss would be silently "
            "zero. Usual causes: the chat template does not match the LLM's tokenizer, or every "
            "assistant reply was truncated by model.max_length"
        )
    return n


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over supervised positions, divided by the item count.
    `weights` (B, T) as `labels`."""
    shifted = None if weights is None else weights[:, 1:]
    return token_loss(logits[:, :-1], labels[:, 1:], num_items_in_batch, shifted)


def token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of aligned logits (B, K, V) and targets (B, K), summed over targets != -100 (each
    times its `weights` (B, K) entry when given) and divided by `num_items_in_batch` (default: the
    weighted count). Returns the loss and the number of supervised targets."""
    n = check_supervised(targets)
    logits = logits.float()  # (B, K, V)
    if weights is None:
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss / (num_items_in_batch or n), n
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)  # (B, K); 0 where ignored
    w = weights.to(per_token.dtype) * (targets != IGNORE_INDEX)  # (B, K)
    return (per_token * w).sum() / (num_items_in_batch or w.sum()), n
