"""Deep fusion: CogVLM-style visual experts inside the language model's layers.

Shallow fusion (every bridge) puts image features at the LM's input and lets the LM's own weights
process them. Deep fusion (`model.fusion: deep`) gives every decoder layer a *visual expert*: its
own query/key/value projections and its own MLP, applied at image-token positions only. Text
positions go through the LM's weights; attention is shared over the whole sequence, so text
attends to image keys/values made by the expert and the other way round:

    layer l, hidden h (B, T, D), image mask m (B, T):
        q, k, v = where(m, expert_l.qkv(norm(h)), lm_l.qkv(norm(h)))   # then RoPE, shared attention
        mlp_out = where(m, expert_l.mlp(norm(h')), lm_l.mlp(norm(h')))

The LM itself stays frozen and untouched: the experts are a separate module
(`SeeChatModel.visual_experts`), initialised as copies of each layer's own weights (so an
untrained deep model equals the shallow one) and saved on their own (`visual_experts.safetensors`).
They reach into the LM through PyTorch forward hooks on the LM's q/k/v projection and MLP
*instances*, which act only inside `VisualExperts.routing(mask)`, the scope `SeeChatModel.forward`
opens around one LM call that holds image tokens. Outside that scope (any text-only forward, every
decode step, a direct call of the LM) the hooks return nothing and the LM computes exactly what
the base model computes: the superset guarantee, tested bit for bit.

Which layer modules to hook comes from the explicit `DEEP_FUSION_LMS` registry by the LM's
`model_type`; other LMs are refused with the list. Not supported: gradient checkpointing (its
recompute runs in the backward pass, outside the routing scope; `train` refuses the combination).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

FUSIONS = ("shallow", "deep")
PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def llama_style_sites(lm: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(self_attn, mlp) of every decoder layer of a Llama-style decoder (separate q/k/v projections)."""
    return [(layer.self_attn, layer.mlp) for layer in lm.get_decoder().layers]


# Explicit registry: LM model_type -> where its layers' attention projections and MLPs are.
# Tested: qwen2 and llama (tiny random instances); the fast decode path knows the same families.
DEEP_FUSION_LMS: dict[str, Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]] = {
    "qwen2": llama_style_sites,
    "llama": llama_style_sites,
}


class VisualExpert(nn.Module):
    """One layer's image-position weights: q/k/v projections and an MLP, copies of the layer's own."""

    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.q_proj = copy.deepcopy(attn.q_proj)
        self.k_proj = copy.deepcopy(attn.k_proj)
        self.v_proj = copy.deepcopy(attn.v_proj)
        self.mlp = copy.deepcopy(mlp)


class VisualExperts(nn.Module):
    """A visual expert per LM layer, wired to the LM's modules through scoped forward hooks."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        model_type = lm.config.get_text_config().model_type
        if model_type not in DEEP_FUSION_LMS:
            raise ValueError(
                f"model.fusion=deep supports the LM families {', '.join(DEEP_FUSION_LMS)}; this LM is "
                f"{model_type!r}. Use model.fusion=shallow"
            )
        sites = DEEP_FUSION_LMS[model_type](lm)
        self.layers = nn.ModuleList(VisualExpert(attn, mlp) for attn, mlp in sites)
        self._mask: torch.Tensor | None = None  # (B, T) bool, set only inside `routing`
        self._hooks = []
        for expert, (attn, mlp) in zip(self.layers, sites, strict=True):
            for name in PROJECTIONS:
                hook = partial(self._route, getattr(expert, name))
                self._hooks.append(getattr(attn, name).register_forward_hook(hook))
            self._hooks.append(mlp.register_forward_hook(partial(self._route, expert.mlp)))

    def _route(self, expert: nn.Module, module: nn.Module, args: tuple, output: torch.Tensor):
        """Forward hook of an LM module: its output at image positions replaced by the expert's.
        Returns None (output unchanged) outside `routing`."""
        mask = self._mask
        if mask is None:
            return None
        x = args[0]  # (B, T, D_in), the module's input
        if x.shape[:2] != mask.shape:
            raise RuntimeError(
                f"visual experts: image mask {tuple(mask.shape)} does not match the LM's hidden states "
                f"{tuple(x.shape[:2])}"
            )
        return output.index_put((mask,), expert(x[mask]).to(output.dtype))  # (B, T, D_out)

    @contextmanager
    def routing(self, image_mask: torch.Tensor) -> Iterator[None]:
        """Within this scope the LM's image positions (`image_mask` (B, T), True = image token of the
        current forward's input) take the experts' weights. A mask without image tokens is a no-op."""
        if not bool(image_mask.any()):
            yield
            return
        self._mask = image_mask
        try:
            yield
        finally:
            self._mask = None

    def detach_hooks(self) -> None:
        """Unhook from the LM (the experts then have no effect)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def build_visual_experts(fusion: str, lm: nn.Module) -> VisualExperts | None:
    """The experts `fusion` asks for: None for shallow fusion, a `VisualExperts` hooked into `lm`
    for deep fusion."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSIONS)}")
    return VisualExperts(lm) if fusion == "deep" else None
