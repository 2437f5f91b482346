"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

A resume point is a directory, written atomically:

    trainable.safetensors   every parameter with requires_grad (bridge, LM / LoRA, vision), full size
    optimizer.safetensors   the optimizer's per-parameter tensors (AdamW moments, step counts), by
                            parameter name, full size; and the RNG states
    state.json              step, data position, optimizer hyper-parameters, RNG states, config

`torch.save` / `accelerator.save_state` pickle the optimizer; loading a pickle executes code, so a
checkpoint downloaded from someone else would be a security hole. This format cannot execute
anything on load.

Tensors go through `torch.distributed.checkpoint.state_dict`, so one format serves a plain module,
DDP and FSDP2: under FSDP every rank takes part in gathering the full tensors to rank 0
(`gather_training_state`), and on resume rank 0 reads the files and broadcasts each tensor, which
every rank re-shards as its own parameters are sharded (`load_resume`). A resume point written by
8 sharded GPUs therefore resumes on 1 GPU, or under DDP, and the other way round.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from seechat.atomic import atomic_directory

FORMAT = "seechat-resume/2"  # 2: optimizer tensors keyed by parameter name (1: by index)


@dataclass
class Position:
    """Where training is: optimizer steps done, and the data stream's place in its epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    samples_seen: int = 0  # global
    tokens_seen: int = 0  # global supervised tokens


@dataclass
class TrainingState:
    """Full (unsharded) CPU copies of what a resume point and a checkpoint hold. Under FSDP only
    rank 0's copy is filled; the other ranks hold empty dicts."""

    params: dict[str, torch.Tensor]  # trainable parameters by name, tied aliases included
    optimizer: dict[str, Any]  # {"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}
    names: set[
        str
    ]  # one name per trainable parameter, as named_parameters gives it: what a resume point holds


def rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors) rather than whole tensors."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def trainable_names(model: torch.nn.Module, aliases: bool = False) -> set[str]:
    """Names of the trainable parameters without DDP / FSDP prefixes: one per parameter, as
    `named_parameters` gives them, or with `aliases` every name `get_model_state_dict` uses, tied
    ones included (`lm_head.weight` next to `embed_tokens.weight`)."""
    core = _unwrap(model)
    if not aliases:
        return {n for n, p in core.named_parameters() if p.requires_grad}
    return {
        k
        for k, v in core.state_dict(keep_vars=True).items()
        if isinstance(v, torch.nn.Parameter) and v.requires_grad
    }


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def gather_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Full CPU copies of the trainable parameters and the optimizer state. Collective under FSDP:
    every rank must call it; rank 0 receives the tensors."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    names = trainable_names(model, aliases=True)
    params = {k: v for k, v in get_model_state_dict(model, options=opts).items() if k in names}
    optim = get_optimizer_state_dict(model, _inner(optimizer), options=opts)
    return TrainingState(params, optim, trainable_names(model))


def save_resume(directory: Path, state: TrainingState, position: Position, extra: dict[str, Any]) -> None:
    """Write a resume point atomically (temp dir + rename); the previous one survives a crash.
    Called on rank 0 only, with what `gather_training_state` gave it."""
    with atomic_directory(directory) as tmp:
        params = {
            k: v.detach().contiguous() for k, v in state.params.items() if k in state.names
        }  # no aliases
        save_file(params, tmp / "trainable.safetensors")
        tensors, scalars = {}, {}
        for name, st in state.optimizer["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"state.{name}.{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars.setdefault(name, {})[k] = v
        save_file({**tensors, **rng_tensors()}, tmp / "optimizer.safetensors")
        meta = {"param_groups": state.optimizer["param_groups"], "scalars": scalars}
        doc = {"format": FORMAT, "position": asdict(position), "optimizer": meta, "rng": rng_state(), **extra}
        (tmp / "state.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")


def read_resume_state(directory: Path) -> dict[str, Any]:
    """The resume point's state.json (position, config, data positions), checked for format."""
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    if state.get("format") != FORMAT:
        raise ValueError(
            f"resume point {directory} was written by an older seechat (format "
            f"{state.get('format', 'seechat-resume/1')!r}, this one reads {FORMAT!r}); start over "
            f"with `seechat train --no-resume` (or `seechat demo --redo STAGE`), or delete {directory}"
        )
    return state


def load_resume(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Position, dict]:
    """Restore trainable weights, optimizer and RNG into a model and optimizer already prepared
    (DDP- or FSDP-wrapped, or plain); returns the position and the state.json dict. Collective
    under FSDP: rank 0 reads the files and broadcasts, the others receive their shards."""
    state = read_resume_state(directory)
    broadcast = is_sharded(model) and dist.is_initialized() and dist.get_world_size() > 1
    reads = not broadcast or dist.get_rank() == 0
    params = load_file(directory / "trainable.safetensors") if reads else {}
    with safe_open(directory / "optimizer.safetensors", framework="pt") as f:
        # every rank sets the RNG states kept here; only a reading rank needs the (full-size) moments
        tensors = {k: f.get_tensor(k) for k in f.keys() if reads or k.startswith("rng.")}
    if reads:
        expected = trainable_names(model)
        if set(params) != expected:
            missing, unexpected = sorted(expected - set(params)), sorted(set(params) - expected)
            raise ValueError(
                f"resume point {directory} does not match this run's trainable parameters "
                f"(missing {missing[:3]}…, unexpected {unexpected[:3]}…); was the config changed?"
            )
    opts = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=broadcast)
    set_model_state_dict(model, params, options=opts)
    optim: dict[str, Any] = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    if reads:
        for key, v in tensors.items():
            if key.startswith("state."):
                name, k = key[len("state.") :].rsplit(".", 1)
                optim["state"].setdefault(name, {})[k] = v
        for name, kv in state["optimizer"]["scalars"].items():
            optim["state"].setdefault(name, {}).update(kv)
    set_optimizer_state_dict(model, _inner(optimizer), optim, options=opts)
    set_rng(state["rng"], {k: v for k, v in tensors.items() if k.startswith("rng.")})
    return Position(**state["position"]), state
