"""`train.report_to`: the trackers get the JSONL metrics, the held-out loss and the config, read back
with each tracker's own code. Resume and rank 0: tests/train/test_loop.py, test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seechat.config import ConfigError, load_config
from seechat.train.loop import train
from seechat.train.trackers import TRACKERS, TrackerNotInstalledError, check_installed
from tests.conftest import tiny_overrides
from tests.train.tracker_readers import (
    HAS_TENSORBOARD,
    HAS_WANDB,
    tensorboard_hparams,
    tensorboard_raw_steps,
    tensorboard_scalars,
    wandb_config,
    wandb_history,
)

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "seechat" / "mini" / "recipes" / "stage1.yaml"
TRAIN_KEYS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "supervised_tokens_per_step")


def overrides(w, out, **extra) -> list[str]:
    return tiny_overrides(
        w,
        out,
        **{
            "data.paths": f"{w['world']}/pairs/train/{{00000..00003}}.tar",
            "train.batch_size": 4,
            "model.bridge.type": "qformer",
            "model.bridge.num_queries": 8,
            "optim.warmup_steps": 2,
            **extra,
        },
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(r) for r in path.read_text().splitlines()]


def test_report_to_is_a_checked_list():
    assert load_config(None, ["train.report_to=tensorboard"]).train.report_to == ("tensorboard",)
    assert load_config(None, ["train.report_to=[tensorboard, wandb]"]).train.report_to == (
        "tensorboard",
        "wandb",
    )
    assert load_config(None, []).train.report_to == ()  # default: only metrics.jsonl and loss.png
    with pytest.raises(ConfigError, match=r"train.report_to\[0\].*'tensorboard', 'wandb'"):
        load_config(None, ["train.report_to=[mlflow]"])


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_a_tracker_that_is_not_installed_is_named_with_its_extra(name, tiny_world, tmp_path):
    try:
        check_installed([name])
        pytest.skip(f"{name} is installed here")
    except TrackerNotInstalledError:
        pass
    out = tmp_path / "run"
    with pytest.raises(TrackerNotInstalledError, match=rf"pip install 'seechat\[{name}\]'"):
        train(load_config(STAGE1, overrides(tiny_world, out, **{"train.report_to": name})))
    assert not out.exists()  # refused before anything was built or written


@pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard not installed (pip install 'seechat[tensorboard]')"
)
def test_tensorboard_gets_the_metrics_the_held_out_loss_and_the_config(tiny_world, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        STAGE1,
        overrides(
            tiny_world,
            out,
            **{
                "train.max_steps": 4,
                "train.report_to": "tensorboard",
                "train.eval_every": 2,
                "data.eval_paths": f"{tiny_world['world']}/pairs/val/*.tar",
            },
        ),
    )
    train(cfg)
    logged, evals = rows(out / "train" / "metrics.jsonl"), rows(out / "train" / "eval.jsonl")
    tb = tensorboard_scalars(out / "train" / "tensorboard")
    for key in TRAIN_KEYS:
        assert [s for s, _ in tb[f"train/{key}"]] == [1, 2, 3, 4], key
        assert [v for _, v in tb[f"train/{key}"]] == pytest.approx([r[key] for r in logged], rel=1e-6), key
    # supervised tokens per step (log_every=1): they add up to the run's count
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert sum(r["supervised_tokens_per_step"] for r in logged) == summary["tokens_seen"]
    for r in logged:  # tokens_per_s counts every input token: image and prompt tokens too
        assert (
            r["tokens_per_s"] / r["samples_per_s"]
            > r["supervised_tokens_per_step"] / cfg.train.batch_size + 8
        )
    # the held-out loss at eval_every and at the end, over the whole validation split (8 pairs)
    assert [r["step"] for r in evals] == [2, 4] and {r["samples"] for r in evals} == {8}
    assert [s for s, _ in tb["eval/loss"]] == [2, 4]
    assert [v for _, v in tb["eval/loss"]] == pytest.approx([r["loss"] for r in evals], rel=1e-6)
    assert 0 < evals[-1]["loss"] < evals[0]["loss"] * 1.5
    hp = tensorboard_hparams(out / "train" / "tensorboard")
    assert hp["optim.lr"] == pytest.approx(cfg.optim.lr) and hp["model.bridge.type"] == "qformer"
    assert hp["train.max_steps"] == 4 and json.loads(hp["train.report_to"]) == ["tensorboard"]
    assert all(n == 1 for n in tensorboard_raw_steps(out / "train" / "tensorboard", "train/loss").values())


@pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed (pip install 'seechat[wandb]')")
def test_wandb_offline_gets_the_metrics_and_the_config(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = load_config(
        STAGE1, overrides(tiny_world, out, **{"train.max_steps": 3, "train.report_to": "wandb"})
    )
    train(cfg)
    run_id = json.loads((out / "train" / "trackers.json").read_text())["wandb_run_id"]
    (run_file,) = (out / "train" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history, logged = wandb_history(run_file), rows(out / "train" / "metrics.jsonl")
    assert sorted(history) == [1, 2, 3]
    for key in TRAIN_KEYS:
        assert [history[s][f"train/{key}"] for s in (1, 2, 3)] == [r[key] for r in logged], key
    config = wandb_config(run_file)
    assert config["optim.lr"] == cfg.optim.lr and config["model.bridge.type"] == "qformer"
