"""save -> load gives identical logits for bridge-only, full and LoRA checkpoints; no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from seechat.atomic import OutputOverlapError
from seechat.config import TrainableConfig
from seechat.data.collate import collate
from seechat.model import apply_trainable, build, load, merge_lora
from seechat.model.checkpoint import write_checkpoint
from tests.helpers import CONVERSATION, model_config

SETTINGS = {
    "bridge_only": (TrainableConfig(lm="frozen"), {"vision": "base", "lm": "base"}),
    "full": (TrainableConfig(lm="full", vision="full"), {"vision": "full", "lm": "full"}),
    "lora": (TrainableConfig(lm="lora", vision="lora"), {"vision": "lora", "lm": "lora"}),
}


def perturb(model) -> None:
    """Stand-in for training: move every trainable weight so a reload that ignores it shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_save_load_identical_logits(experts, images, tmp_path, setting):
    trainable, parts = SETTINGS[setting]
    torch.manual_seed(0)
    model, proc = build(model_config(experts, bridge="resampler"))
    apply_trainable(model, trainable)
    perturb(model)
    model.eval()
    batch = collate([proc.encode_conversation(CONVERSATION, images[:1])], proc.tokenizer.pad_token_id)
    before = model(**batch).logits

    write_checkpoint(model, proc, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["parts"] == parts
    assert not list((tmp_path / "ckpt").rglob("*.bin")) and not list((tmp_path / "ckpt").rglob("*.pt"))
    if setting == "bridge_only":
        assert not (tmp_path / "ckpt" / "language_model").exists()

    loaded, proc2 = load(tmp_path / "ckpt")
    batch2 = collate([proc2.encode_conversation(CONVERSATION, images[:1])], proc2.tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    torch.testing.assert_close(loaded(**batch2).logits, before, rtol=0, atol=1e-5)

    if setting == "lora":
        merge_lora(tmp_path / "ckpt", tmp_path / "merged")
        merged, _ = load(tmp_path / "merged")
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["parts"] == SETTINGS["full"][1]
        torch.testing.assert_close(merged(**batch2).logits, before, rtol=1e-4, atol=1e-4)


def test_save_is_atomic_and_overwrites(experts, tmp_path):
    model, proc = build(model_config(experts))
    write_checkpoint(model, proc, tmp_path / "ckpt")
    write_checkpoint(model, proc, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_loading_a_non_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a seechat checkpoint"):
        load(tmp_path)


def test_merge_lora_onto_its_own_source_is_refused(tmp_path, capsys):
    from seechat.cli import main

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(OutputOverlapError, match="is the source itself"):
        merge_lora(tmp_path / "ckpt", tmp_path / "ckpt")
    assert main(["merge-lora", str(tmp_path / "ckpt"), str(tmp_path)]) == 2
    assert "contains the source" in capsys.readouterr().err and (tmp_path / "ckpt").is_dir()


def test_a_checkpoint_set_aside_by_a_killed_save_is_loaded(experts, tmp_path):
    """A save killed between its two renames leaves no `ckpt`, only `.ckpt.old-*`: loading finds it,
    and the next save puts it back first."""
    model, proc = build(model_config(experts))
    write_checkpoint(model, proc, tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old-0123abcd")
    assert load(tmp_path / "ckpt")[0].num_image_tokens == model.num_image_tokens
    write_checkpoint(model, proc, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
