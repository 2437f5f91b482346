"""Does a patch grid aligned with the scenes' 3x3 cells make the mini vision expert read shape?

    python docs/experiments/mini_diagnosis/clip_probe.py 96 16   # world at 96 px, 16-px patches
    python docs/experiments/mini_diagnosis/clip_probe.py 64 8    # the demo's default

Builds the world at that size under /tmp/mini_diagnosis, trains the mini CLIP with the default recipe
otherwise, prints `evaluate_clip` on the val split as one JSON line.
"""

import json
import sys
import time

from seechat.mini.clip_expert import ClipRecipe, evaluate_clip, train_mini_clip
from seechat.mini.world import WorldConfig, build_world

size, patch = int(sys.argv[1]), int(sys.argv[2])
root = f"/tmp/mini_diagnosis/world{size}"
build_world(root, WorldConfig(image_size=size))
start = time.time()
out = train_mini_clip(
    root, f"/tmp/mini_diagnosis/clip{size}_{patch}", ClipRecipe(image_size=size, patch_size=patch)
)
seconds = time.time() - start
result = {k: round(v, 3) for k, v in evaluate_clip(out, root, "val").items()}
print(json.dumps({"size": size, "patch": patch, "train_s": round(seconds, 1), **result}))
