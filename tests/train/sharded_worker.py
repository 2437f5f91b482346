"""Worker of test_sharded_state: trains a few steps of the real stage-2 model, sharded with FSDP2
(`fully_shard` per decoder layer, then the root, as accelerate's TRANSFORMER_BASED_WRAP does) on
the ranks `torchrun` starts, or unsharded in one plain process; saves or resumes through
`seechat.train.state`. Every rank sees the same batch, so sharded and plain runs compute the same
numbers up to float summation order.

    python -m tests.train.sharded_worker MODE OVERRIDES.json OUT [--shard] [--resume-from DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from seechat.config import load_config
from seechat.data.collate import collate
from seechat.model.checkpoint import write_checkpoint
from seechat.train.data import load_conversation_dataset
from seechat.train.loop import build_model, make_optimizer
from seechat.train.state import Position, gather_training_state, is_sharded, load_resume, save_resume

STAGE2 = Path(__file__).resolve().parents[2] / "seechat" / "mini" / "recipes" / "stage2.yaml"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train_save", "resume"])
    p.add_argument("overrides")
    p.add_argument("out")
    p.add_argument("--shard", action="store_true")
    p.add_argument("--resume-from")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.shard:
        dist.init_process_group("gloo")
    rank0 = not a.shard or dist.get_rank() == 0
    cfg = load_config(STAGE2, json.loads(Path(a.overrides).read_text()))
    torch.manual_seed(0)
    model, processor = build_model(cfg)
    if a.shard:  # an explicit CPU mesh: on a machine with a GPU the default mesh would be CUDA's
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.language_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert is_sharded(model)
    optimizer = make_optimizer(model, cfg)
    data = load_conversation_dataset(cfg.data, processor)
    batch = collate([data[i] for i in range(8)], processor.tokenizer.pad_token_id)

    def step() -> float:
        loss = model(**batch, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    out = Path(a.out)
    result: dict = {"world_size": dist.get_world_size() if a.shard else 1}
    if a.mode == "train_save":
        result["losses"] = [step(), step()]
        state = gather_training_state(model, optimizer)
        if rank0:
            save_resume(out / "resume", state, Position(step=2), {"note": "sharded_worker"})
            write_checkpoint(model, processor, out / "ckpt", state=state.params)
        result["losses"].append(step())
    else:
        pos, _ = load_resume(Path(a.resume_from), model, optimizer)
        again = gather_training_state(model, optimizer)  # what the load put into the (sharded) model
        if rank0:
            save_resume(out / "reloaded", again, pos, {})
        result["step"], result["losses"] = pos.step, [step()]
    if rank0:
        (out / "result.json").write_text(json.dumps(result))
    if a.shard:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
