"""Fresh training data for the mini experts: scenes that never repeat, made batch by batch.

The mini world is procedural, so expert pretraining never needs to show an example twice: each
training step draws new scenes, renders them and writes new text about them. Measured on this
world, an LM trained on a fixed corpus of QA rows memorises them (training loss 0.002, held-out
reading stuck at 63-65 %), while fresh rows keep teaching the skill (docs/mini-world-results.md).

- `step_rng(kind, seed, step)`: the random source of one step; a batch is a pure function of
  (kind, seed, step), so a run is reproducible whatever the number of loader workers.
- `fresh_scenes(rng, n, ...)`: `n` new scenes, never one whose *meaning* (`scenes.fingerprint`) is in
  the default world's val or test split, so those splits stay held out for the experts too.
- `step_batches(make, steps, workers)`: batches 0..steps-1 of `make(step)`, built by `workers`
  processes (worker w builds steps w, w + workers, ...; the loader returns them in step order).
- `text_fingerprint()`: a hash of what the world's generators write and draw; the shipped experts
  record it, and a test fails when the world's text or pictures change under them.

Not here: what a batch holds (`seechat.mini.clip_expert`, `seechat.mini.lm_expert`), the world on
disk (`seechat.mini.world`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seechat.mini import scene_text
from seechat.mini.scenes import Scene, fingerprint, generate_scene, render
from seechat.mini.world import WorldConfig, split_scenes


def step_rng(kind: str, seed: int, step: int) -> random.Random:
    """The random source of training step `step` of an expert recipe."""
    return random.Random(f"seechat-mini/fresh/{kind}/{seed}/{step}")


@functools.cache
def held_out_meanings() -> frozenset[str]:
    """Fingerprints of the default world's val and test scenes (never drawn for expert training)."""
    splits = split_scenes(WorldConfig())
    return frozenset(fingerprint(s) for split in ("val", "test") for s in splits[split])


def fresh_scenes(rng: random.Random, n: int, image_size: int = 64, max_objects: int = 4) -> list[Scene]:
    """`n` new scenes from `rng`, none with the meaning of a default val/test scene."""
    taken = held_out_meanings()
    out: list[Scene] = []
    while len(out) < n:
        scene = generate_scene(rng, image_size, max_objects)
        if fingerprint(scene) not in taken:
            out.append(scene)
    return out


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """Scenes -> uint8 pixels (B, 3, H, W)."""
    return (
        torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes])).permute(0, 3, 1, 2).contiguous()
    )


class _Steps(IterableDataset):
    def __init__(self, make: Callable[[int], Any], steps: int):
        self.make, self.steps = make, steps

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w, n = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(w, self.steps, n):
            yield self.make(step)


def step_batches(make: Callable[[int], Any], steps: int, workers: int = 0) -> Iterator[Any]:
    """`make(0)`, `make(1)`, ... `make(steps - 1)`, built in `workers` background processes
    (0: in this process). `make` must be picklable (a module-level function or a partial of one)."""
    loader = DataLoader(
        _Steps(make, steps),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader


def text_fingerprint(n_scenes: int = 64) -> str:
    """Hash of the world's generators: the character set, and for fixed scenes their pixels and
    every kind of text written about them (captions, boxes, questions, dialogues, alt-text)."""
    h = hashlib.sha1("".join(scene_text.charset()).encode())
    rng = random.Random("seechat-mini/fingerprint")
    for scene in [generate_scene(rng) for _ in range(n_scenes)]:
        h.update(np.asarray(render(scene)).tobytes())
        g = scene_text.grounding(scene, rng)
        items: list[Any] = [
            scene_text.concise_caption(scene),
            scene_text.concise_caption(scene, rng),
            scene_text.detailed_caption(scene, rng),
            scene_text.detailed_caption(scene, rng, boxes=True),
            scene_text.dialogue(scene, rng),
            scene_text.alt_text(scene, rng).text,
            [q.__dict__ for q in scene_text.vqa_set(scene, rng, len(scene_text.QUESTION_TYPES))],
            g and g.answer,
            scene_text.chitchat(rng),
            scene_text.caption_instruction(rng),
            scene_text.grounding_instruction("X", rng),
        ]
        h.update(json.dumps(items, ensure_ascii=False).encode())
    return h.hexdigest()[:16]
