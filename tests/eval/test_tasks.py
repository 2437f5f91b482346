"""`seechat eval vqa|caption|grounding|detection` end to end on a tiny random checkpoint: one prediction per
row, reports that agree with the metric functions recomputed from predictions.jsonl, unreadable
images reported by id, and a real 2-process run (torchrun, CPU) that gives the 1-process numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seechat.cli import main
from seechat.data.jsonl import read_jsonl, write_jsonl
from seechat.eval.bleu import bleu
from seechat.eval.cider import cider_d
from seechat.eval.grounding import grounding_accuracy
from seechat.eval.normalize import normalize_caption
from seechat.eval.tasks import score_detection, shard_batches
from seechat.eval.vqa import vqa_accuracy

ROOT = Path(__file__).resolve().parents[2]


def run_cli(task: str, world_ckpt: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "eval",
            task,
            "--model",
            str(world_ckpt),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "4",
            "--no-progress",
            *extra,
        ]
    )


def outputs(out: Path) -> tuple[dict, list[dict]]:
    return json.loads((out / "report.json").read_text(encoding="utf-8")), read_jsonl(
        out / "predictions.jsonl"
    )


@pytest.fixture(scope="module")
def vqa_runs(world_ckpt, tiny_world, tmp_path_factory) -> dict[str, Path]:
    """A run on the world's test VQA file, then one on a copy whose even rows' answers are the
    first run's predictions, so the accuracy (overall and per type) is not trivially 0."""
    root = tmp_path_factory.mktemp("vqa_runs")
    test = Path(tiny_world["world"]) / "test" / "vqa.jsonl"
    assert run_cli("vqa", world_ckpt, test, root / "plain", "--limit", "10") == 0
    _, preds = outputs(root / "plain")
    rows = read_jsonl(test)[:10]
    rigged = [
        {**r, "answer": p["prediction"]} if i % 2 == 0 else r
        for i, (r, p) in enumerate(zip(rows, preds, strict=True))
    ]
    write_jsonl(root / "rigged.jsonl", rigged)
    assert (
        run_cli(
            "vqa", world_ckpt, root / "rigged.jsonl", root / "rigged", "--image-root", tiny_world["world"]
        )
        == 0
    )
    return {
        "test": test,
        "plain": root / "plain",
        "rigged_data": root / "rigged.jsonl",
        "rigged": root / "rigged",
    }


def test_vqa_report_equals_metrics_recomputed_from_predictions(vqa_runs, tiny_world):
    for name in ("plain", "rigged"):
        report, preds = outputs(vqa_runs[name])
        assert report["rows"] == report["scored"] == len(preds) == 10 and report["skipped"] == []
        res = vqa_accuracy(
            [p["prediction"] for p in preds], [p["reference"] for p in preds], [p["type"] for p in preds]
        )
        assert report["metrics"]["accuracy"] == res.accuracy
        assert report["metrics"]["accuracy_by_type"] == res.per_type
        assert report["metrics"]["count_by_type"] == res.type_counts
        assert [p["correct"] for p in preds] == res.correct
    plain, _ = outputs(vqa_runs["plain"])
    assert plain["image_root"] == tiny_world["world"]  # world/test/vqa.jsonl names images/test/x.jpg
    rigged, preds = outputs(vqa_runs["rigged"])
    assert rigged["metrics"]["accuracy"] >= 0.5 and all(p["correct"] for p in preds[::2])
    assert [p["id"] for p in preds] == [r["id"] for r in read_jsonl(vqa_runs["rigged_data"])]
    assert preds[0]["prompt"] == "<image>\n" + preds[0]["prompt"].split("\n", 1)[1]
    md = (vqa_runs["rigged"] / "report.md").read_text(encoding="utf-8")
    assert "accuracy by question type" in md and f"{rigged['metrics']['accuracy']:.4f}" in md


def test_two_processes_give_the_one_process_predictions_and_metrics(
    world_ckpt, vqa_runs, tiny_world, tmp_path
):
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "seechat.cli",
        "eval",
        "vqa",
        "--model",
        str(world_ckpt),
        "--data",
        str(vqa_runs["rigged_data"]),
        "--out",
        str(out),
        "--image-root",
        tiny_world["world"],
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, one_preds = outputs(vqa_runs["rigged"])
    two, two_preds = outputs(out)
    assert two["settings"]["num_processes"] == 2 and one["settings"]["num_processes"] == 1
    assert two["metrics"] == one["metrics"]
    assert two_preds == one_preds
    assert not (out / ".shards").exists()  # rank 0 merged and removed the per-rank files


def test_caption_report_equals_metrics_recomputed_from_predictions(world_ckpt, tiny_world, tmp_path):
    data = Path(tiny_world["world"]) / "test" / "captions.jsonl"
    assert run_cli("caption", world_ckpt, data, tmp_path, "--limit", "8") == 0
    report, preds = outputs(tmp_path)
    assert report["scored"] == len(preds) == 8
    cands, refs = [p["prediction"] for p in preds], [p["reference"] for p in preds]
    assert report["metrics"]["cider_d"] == cider_d(cands, refs).score
    assert report["metrics"]["bleu_4"] == bleu(cands, refs).score
    exact = [
        normalize_caption(c) in {normalize_caption(r) for r in rs} for c, rs in zip(cands, refs, strict=True)
    ]
    assert report["metrics"]["exact_match"] == sum(exact) / len(exact)
    assert [p["cider_d"] for p in preds] == cider_d(cands, refs).per_image
    assert report["settings"]["tokenize"] == "char"


def test_eval_caption_and_seechat_caption_decode_the_same_way(world_ckpt, tiny_world, tmp_path):
    """Both go through the engine: the same prompt gives the same caption for every image."""
    from seechat.infer.caption import caption
    from seechat.infer.engine import Engine
    from seechat.infer.sampling import SamplingParams
    from seechat.model import load

    world = Path(tiny_world["world"])
    assert (
        run_cli("caption", world_ckpt, world / "test" / "captions.jsonl", tmp_path / "eval", "--limit", "6")
        == 0
    )
    _, preds = outputs(tmp_path / "eval")
    write_jsonl(tmp_path / "images.jsonl", [{"image": p["image"]} for p in preds])
    model, processor = load(world_ckpt)
    with Engine(model, processor) as engine:
        counts = caption(
            engine,
            processor,
            [str(tmp_path / "images.jsonl")],
            tmp_path / "captions.jsonl",
            params=SamplingParams(max_new_tokens=6),
            image_root=str(world),
            progress=False,
        )
    assert counts["written"] == 6
    captioned = {r["image"]: r["caption"] for r in read_jsonl(tmp_path / "captions.jsonl")}
    assert captioned == {p["image"]: p["prediction"] for p in preds}


def test_grounding_counts_parse_failures(world_ckpt, tiny_world, tmp_path):
    data = Path(tiny_world["world"]) / "test" / "grounding.jsonl"
    assert (
        run_cli(
            "grounding",
            world_ckpt,
            data,
            tmp_path,
            "--limit",
            "8",
            "--prompt",
            "<image>\n{expression}在哪里？",
        )
        == 0
    )
    report, preds = outputs(tmp_path)
    assert len(preds) == 8 and preds[0]["prompt"].endswith("在哪里？")
    res = grounding_accuracy([p["prediction"] for p in preds], [p["reference"] for p in preds])
    assert report["metrics"]["acc_at_0.5"] == res.accuracy
    assert (
        report["metrics"]["parse_failures"]
        == res.parsed.count(False)
        == [p["parsed"] for p in preds].count(False)
    )


def test_missing_and_corrupt_images_are_reported_by_id(world_ckpt, tiny_world, tmp_path, capsys):
    rows = read_jsonl(Path(tiny_world["world"]) / "test" / "vqa.jsonl")[:6]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    rows[1] = {**rows[1], "image": "images/test/no-such-image.jpg"}
    rows[4] = {**rows[4], "image": str(corrupt)}
    write_jsonl(tmp_path / "vqa.jsonl", rows)
    assert (
        run_cli(
            "vqa", world_ckpt, tmp_path / "vqa.jsonl", tmp_path / "out", "--image-root", tiny_world["world"]
        )
        == 1
    )
    assert rows[1]["id"] in capsys.readouterr().out
    report, preds = outputs(tmp_path / "out")
    assert [s["id"] for s in report["skipped"]] == [rows[1]["id"], rows[4]["id"]]
    assert "no such file" in report["skipped"][0]["error"] and "decoded" in report["skipped"][1]["error"]
    assert report["rows"] == len(preds) == 6 and report["scored"] == 4
    assert preds[1]["prediction"] is None and preds[1]["error"] and "correct" not in preds[1]
    assert (
        report["metrics"]["count_by_type"]
        == vqa_accuracy(
            [p["prediction"] for p in preds if p["prediction"] is not None],
            [p["reference"] for p in preds if p["prediction"] is not None],
            [p["type"] for p in preds if p["prediction"] is not None],
        ).type_counts
    )
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "Skipped rows (2)" in md and rows[1]["id"] in md and rows[4]["id"] in md


def test_bad_inputs_exit_2_before_decoding(world_ckpt, tiny_world, tmp_path, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "image": "x.jpg", "question": "?"}])
    assert run_cli("vqa", world_ckpt, tmp_path / "bad.jsonl", tmp_path / "o1") == 2
    assert "row 1: missing answer" in capsys.readouterr().err
    data = Path(tiny_world["world"]) / "test" / "vqa.jsonl"
    assert run_cli("vqa", world_ckpt, data, tmp_path / "o2", "--prompt", "<image>{nope}") == 2
    assert "'nope'" in capsys.readouterr().err
    assert run_cli("vqa", world_ckpt, data, tmp_path / "o3", "--prompt", "{question}") == 2
    assert "<image> exactly once" in capsys.readouterr().err


def test_shards_are_contiguous_runs_of_the_one_process_batches():
    one = shard_batches(23, 4, 0, 1)
    for world in (1, 2, 3, 5, 8):
        parts = [shard_batches(23, 4, r, world) for r in range(world)]
        assert [b for p in parts for b in p] == one
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_detection_scores_the_predictions_it_wrote(world_ckpt, tiny_world, tmp_path):
    data = Path(tiny_world["world"]) / "test" / "detection.jsonl"
    assert run_cli("detection", world_ckpt, data, tmp_path, "--limit", "4") == 0
    report, preds = outputs(tmp_path)
    rows = read_jsonl(data)[:4]
    assert [p["reference"] for p in preds] == [r["objects"] for r in rows]
    metrics, per_row = score_detection(rows, [p["prediction"] for p in preds])
    assert report["metrics"] == json.loads(json.dumps(metrics))
    assert [p["boxes_parsed"] for p in preds] == [r["boxes_parsed"] for r in per_row]
    assert "Detection by class" in (tmp_path / "report.md").read_text(encoding="utf-8")
    # the world's own answers are perfect detections
    perfect, _ = score_detection(rows, [r["answer"] for r in rows])
    assert perfect["map_at_0.5"] == 1.0 and set(perfect["recall_by_class"].values()) == {1.0}
