"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

A resume point is a directory, written atomically:

    trainable.safetensors   every parameter with requires_grad (bridge, LM / LoRA, vision)
    optimizer.safetensors   the optimizer's per-parameter tensors (AdamW moments, step counts)
    state.json              step, data position, optimizer hyper-parameters, RNG states, config

`torch.save` / `accelerator.save_state` pickle the optimizer; loading a pickle executes code, so a
checkpoint downloaded from someone else would be a security hole. This format cannot execute
anything on load.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from seechat.atomic import atomic_directory


@dataclass
class Position:
    """Where training is: optimizer steps done, and the data stream's place in its epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    samples_seen: int = 0  # global
    tokens_seen: int = 0  # global supervised tokens


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


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into named tensors and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for pid, kv in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(kv)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_resume(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    extra: dict[str, Any],
) -> None:
    """Write a resume point atomically (temp dir + rename); the previous one survives a crash."""
    with atomic_directory(directory) as tmp:
        params = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(params, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file({**opt_tensors, **rng_tensors()}, tmp / "optimizer.safetensors")
        state = {"position": asdict(position), "optimizer": opt_meta, "rng": rng_state(), **extra}
        (tmp / "state.json").write_text(json.dumps(state, ensure_ascii=False, indent=1), encoding="utf-8")


def load_resume(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Position, dict]:
    """Restore trainable weights, optimizer and RNG; returns the position and the state.json dict."""
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    params = load_file(directory / "trainable.safetensors")
    named = dict(model.named_parameters())
    expected = {n for n, p in named.items() if p.requires_grad}
    if set(params) != expected:
        missing, unexpected = sorted(expected - set(params)), sorted(set(params) - expected)
        raise ValueError(
            f"resume point {directory} does not match this run's trainable parameters "
            f"(missing {missing[:3]}…, unexpected {unexpected[:3]}…); was the config changed?"
        )
    with torch.no_grad():
        for n, v in params.items():
            named[n].copy_(v)
    tensors = load_file(directory / "optimizer.safetensors")
    optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("state.")}, state["optimizer"])
    set_rng(state["rng"], {k: v for k, v in tensors.items() if k.startswith("rng.")})
    return Position(**state["position"]), state
