"""Fixtures for seechat.infer tests (and the chat / caption verbs in tests/cli): a tiny random
checkpoint per LM architecture, loaded once; the same images as every kind of captioning input."""

from __future__ import annotations

import json

import pytest

from seechat.model import load
from tests.infer.tiny_engine import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(experts, tmp_path_factory):
    """lm arch -> a tiny mlp2x_gelu checkpoint directory."""
    root = tmp_path_factory.mktemp("infer_ckpt")
    return {lm: write_tiny_checkpoint(experts, root / lm, lm) for lm in ("qwen2", "glm4")}


@pytest.fixture(scope="session")
def tiny(tiny_ckpt):
    """(model, processor) of the qwen2 checkpoint (fast decode path)."""
    return load(tiny_ckpt["qwen2"])


@pytest.fixture(scope="session")
def tiny_glm(tiny_ckpt):
    """(model, processor) of the glm4 checkpoint (generic transformers decode path)."""
    return load(tiny_ckpt["glm4"])


@pytest.fixture
def image_inputs(tmp_path):
    """The same four images as a folder, a .jsonl list, a .txt list and a webdataset shard."""
    import webdataset as wds

    from tests.infer.tiny_engine import coloured, png_bytes

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png", "d.png"]
    for i, name in enumerate(names):
        coloured(i).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"image": f"imgs/{n}"}) + "\n" for n in names))
    (tmp_path / "list.txt").write_text("".join(f"imgs/{n}\n" for n in names))
    shard = tmp_path / "shard-00000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(4):
            w.write({"__key__": f"{i:05d}", "png": png_bytes(coloured(i)), "txt": "x"})
    return {
        "folder": folder,
        "jsonl": tmp_path / "list.jsonl",
        "txt": tmp_path / "list.txt",
        "shard": shard,
        "names": names,
    }
