"""Is a patch's place in the image readable from its features? A linear probe from each image
token to its index (64 classes), trained on 300 val images, scored on 300 test images, for the
frozen vision features and for the stage-2 bridge's output.

    python docs/experiments/mini_diagnosis/position_probe.py runs/mini/stage2
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from seechat.data.jsonl import read_jsonl
from seechat.model import load

model, processor = load(sys.argv[1])
model.eval()
world = Path("runs/mini/world")
rows = (
    read_jsonl(world / "val" / "captions.jsonl")[:300] + read_jsonl(world / "test" / "captions.jsonl")[:300]
)
images = [Image.open(world / r["image"]).convert("RGB") for r in rows]
with torch.no_grad():
    features = model.vision_tower(
        processor.image_processor(images, return_tensors="pt")["pixel_values"]
    )  # (N, P, D)
    bridged = model.bridge(features)  # (N, P, D_lm) for the per-token bridges


def probe(x: torch.Tensor, name: str) -> None:
    n, p, d = x.shape
    target = torch.arange(p).repeat(n)
    flat = x.reshape(n * p, d)
    flat = (flat - flat.mean(0)) / (flat.std(0) + 1e-6)
    train, test = slice(0, 300 * p), slice(300 * p, None)
    weight, bias = torch.zeros(d, p, requires_grad=True), torch.zeros(p, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(flat[train] @ weight + bias, target[train]).backward()
        opt.step()
    accuracy = ((flat[test] @ weight + bias).argmax(1) == target[test]).float().mean().item()
    print(f"{name}: patch-index probe {accuracy:.3f} (chance {1 / p:.3f})")


probe(features, "vision features")
probe(bridged, "bridge output")
