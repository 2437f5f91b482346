"""Resume points of a single small model: format check, and a round trip with tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config

from seechat.train.state import (
    FORMAT,
    Position,
    gather_training_state,
    load_resume,
    read_resume_state,
    save_resume,
)


def test_a_resume_point_of_the_older_format_asks_to_start_over(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"position": {"step": 3}}))  # format 1 had no field
    with pytest.raises(ValueError, match=r"older seechat .*'seechat-resume/1'.*--no-resume"):
        read_resume_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"format": FORMAT, "position": {"step": 3}}))
    assert read_resume_state(tmp_path)["position"]["step"] == 3


def _tied_lm_and_optimizer(seed: int):
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )
    return lm, torch.optim.AdamW(lm.parameters(), lr=1e-2)


def test_resume_round_trip_with_tied_embeddings(tmp_path):
    """lm_head.weight is embed_tokens.weight: the resume point holds it once, under the name
    named_parameters gives it, and loads back into a fresh model and optimizer exactly."""
    lm, opt = _tied_lm_and_optimizer(0)
    ids = torch.randint(0, 32, (2, 6))
    lm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    save_resume(tmp_path, gather_training_state(lm, opt), Position(step=1), {})
    saved = load_file(tmp_path / "trainable.safetensors")
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved
    fresh, fresh_opt = _tied_lm_and_optimizer(1)
    pos, _ = load_resume(tmp_path, fresh, fresh_opt)
    assert pos.step == 1
    for (name, a), b in zip(lm.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(opt.state[a]["exp_avg"], fresh_opt.state[b]["exp_avg"]), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
