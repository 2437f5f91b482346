"""The padding-free benchmark on the mini stage-2 recipe, pointed at the tiny world and experts:
every layout trains on the same samples, and the first-batch loss is the same in each, transformers'
LLaVA (the `--peer` row, built around the same modules) included."""

from __future__ import annotations

import json

from benchmarks.bench_padding_free import LAYOUTS, PEER, main
from tests.conftest import tiny_overrides
from tests.train.test_loop import STAGE2


def test_every_layout_and_the_llava_peer_train_on_the_same_loss(tiny_world, tmp_path):
    w = tiny_world
    overrides = tiny_overrides(
        w,
        str(tmp_path / "run"),
        **{
            "train.init_from": "",
            "train.batch_size": 4,
            "data.paths": f"{w['world']}/instruct/train.jsonl",
            "data.image_root": w["world"],
        },
    )
    out = tmp_path / "res.json"
    args = [str(STAGE2), *overrides, "--batches", "2", "--rounds", "1", "--peer", "--json", str(out)]
    res = main(args)
    assert res == json.loads(out.read_text())
    rows = {r["layout"]: r for r in res["rows"]}
    assert list(rows) == [*LAYOUTS, PEER]
    first = rows[LAYOUTS[0]]["first_batch_loss"]
    assert all(abs(r["first_batch_loss"] - first) < 1e-4 * first for r in rows.values())
    assert rows[PEER]["tokens_computed"] == rows[LAYOUTS[0]]["tokens_computed"] >= res["real_tokens"]
    assert rows[LAYOUTS[2]]["tokens_computed"] == res["real_tokens"] > 0
    assert all(r["step_s_median"] > 0 for r in rows.values())
