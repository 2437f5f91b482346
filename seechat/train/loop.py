"""One `train(cfg)` for every stage, on accelerate: one CPU, one GPU, or many (DDP or FSDP2).

A stage is its config: `trainable` says which groups learn, `data` what they learn from,
`train.init_from` which checkpoint they start from. The loop:

    for each optimizer step:
        take grad_accum micro-batches (train.padding_free: each one row of its samples end to end,
            the LM on varlen attention, seechat.model.varlen); count their supervised tokens across
            all ranks (N)
        for each micro-batch: loss = sum of token losses / N (x world size, undoing DDP's mean);
            train.loss_average `sample` / `square` weighs each conversation's tokens and divides by
            the global weighted count instead (seechat.train.averaging)
        clip, set the warmup + cosine learning rate, step
        log loss / lr / grad norm / throughput; with data.eval_paths, every eval_every steps (and at
        the end) the held-out loss; every save_every steps write a resume point + checkpoint

A non-finite loss stops the run before the optimizer step: the last resume point and checkpoint
on disk are the last good ones. Resume restores weights, optimizer, RNG and the data position,
so a killed and resumed run produces the same numbers as an uninterrupted one. Both are written
crash-safely (`seechat.atomic`); a run killed mid-save finds the previous ones at its next start.

Outputs, in `train.output_dir`:
    config.json, bridge.safetensors, …   the final seechat checkpoint (see seechat.model.checkpoint)
    train/run.yaml                       the resolved run config
    train/metrics.jsonl, train/loss.png  per-log-step metrics and the loss curve; tokens_per_s counts
                                         every input token (image tokens included), the supervised
                                         ones are supervised_tokens_per_step
    train/eval.jsonl                     held-out loss per evaluation (with data.eval_paths)
    train/tensorboard/, train/wandb/     with train.report_to: the same metrics, through accelerate's
                                         trackers, on rank 0 (seechat.train.trackers)
    train/resume/                        the latest resume point (seechat.train.state)
    train/summary.json                   wall time, steps, final loss, skipped samples
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from seechat.atomic import existing, recover
from seechat.config import ModelConfig, RunConfig, from_dict, save_config, to_dict
from seechat.data.jsonl import append_jsonl, read_jsonl, write_jsonl
from seechat.model.build import (
    add_visual_experts,
    apply_trainable,
    build,
    compile_layers,
    enable_activation_checkpointing,
)
from seechat.model.checkpoint import load_checkpoint, read_meta, write_checkpoint
from seechat.model.varlen import use_varlen_attention
from seechat.train.averaging import label_weights, weighted_count
from seechat.train.data import (
    BatchStream,
    StreamSpec,
    count_samples,
    count_supervised,
    count_tokens,
    eval_batches,
    to_device,
)
from seechat.train.plots import plot_loss_curve
from seechat.train.schedule import warmup_cosine
from seechat.train.state import (
    Position,
    gather_training_state,
    load_resume,
    read_resume_state,
    save_resume,
)
from seechat.train.trackers import (
    build_trackers,
    finish_trackers,
    record_config,
    reset_tracker_files,
    truncate_tracker_files,
)

log = logging.getLogger(__name__)

# Architecture fields that must agree between a run and the checkpoint it starts from.
# A shallow checkpoint may start a deep run (its experts start as copies of the LM); not the reverse.
_ARCH_FIELDS = ("vision", "bridge", "lm", "image_token", "fusion")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    wall_seconds: float


def batch_loss(model: torch.nn.Module, batch: dict, average: str, denominator: float | None = None):
    """One micro-batch's training loss under `train.loss_average`, divided by `denominator` (the
    step's global weighted count; default: this batch's own). -> SeeChatOutput with the loss only."""
    cu = batch.get("cu_seq_lens")
    if denominator is None:
        denominator = weighted_count(batch["labels"], average, cu)
    return model(
        **batch,
        num_items_in_batch=denominator,
        loss_weights=label_weights(batch["labels"], average, cu),
        return_logits=False,  # the LM head only where a supervised token is predicted
    )


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    o = cfg.optim
    return o.lr * warmup_cosine(step, o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio)


def check_init_matches(run: ModelConfig, ckpt: ModelConfig, path: str) -> None:
    """`train.init_from`'s architecture is this run's. An expert named by another spelling of the
    same local folder (relative here, absolute in a checkpoint `seechat demo` wrote) is the same."""
    r, c = _resolved_experts(to_dict(run)), _resolved_experts(to_dict(ckpt))
    diff = [f"model.{k}" for k in _ARCH_FIELDS if r[k] != c[k]]
    if (r["fusion"], c["fusion"]) == ("deep", "shallow"):
        diff.remove("model.fusion")
    if diff:
        raise ValueError(
            f"train.init_from={path} was built with a different architecture ({', '.join(diff)} differ); "
            "make the model section of this recipe match the checkpoint's config.json"
        )


def _resolved_experts(model: dict) -> dict:
    """The model dict with each expert path that names a local folder made absolute (a hub id stays)."""

    def resolved(p: str) -> str:
        return str(Path(p).resolve()) if p and Path(p).is_dir() else p

    vision = {**model["vision"], "path": resolved(model["vision"]["path"])}
    lm = {k: resolved(v) if k in ("path", "tokenizer_path") else v for k, v in model["lm"].items()}
    return {**model, "vision": vision, "lm": lm}


def _accelerator(cfg: RunConfig, trackers: list) -> Accelerator:
    """This run's Accelerator. accelerate keeps one AcceleratorState per process and refuses a second
    Accelerator with another mixed precision; a process that trains twice (a notebook, a driver running
    stage 1 in fp32 then stage 2 in bf16) gets a fresh one. The process group (PartialState) stays."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != cfg.train.mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers or None)


def build_model(cfg: RunConfig):
    """The model a run starts from: base experts, or the weights of `train.init_from`."""
    if cfg.train.init_from:
        meta = read_meta(cfg.train.init_from)
        check_init_matches(cfg.model, from_dict(ModelConfig, meta["model"]), cfg.train.init_from)
        model, processor = load_checkpoint(cfg.train.init_from)
        processor.max_length = cfg.model.max_length
        if cfg.model.fusion == "deep":
            model = add_visual_experts(model)
    else:
        model, processor = build(cfg.model)
    apply_trainable(model, cfg.trainable)
    return model, processor


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: every parameter group is frozen in `trainable`")
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr, betas=cfg.optim.betas)


def check_launch(acc: Accelerator) -> None:
    """Refuse launches whose checkpoints would be silently wrong, before any compute is spent."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate runs {acc.num_processes}: "
            "each process would train alone and write the same output. Without a GPU, set "
            "ACCELERATE_USE_CPU=1 for torchrun, or use `accelerate launch --num_processes N`"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise RuntimeError(
            "DeepSpeed is not supported by seechat's loop: its ZeRO optimizer partitions would need "
            "their own gather/scatter for seechat's safetensors resume points (DeepSpeed's own "
            "checkpoints are pickles), and it steps, scales and clips by its own config. Use FSDP "
            "(configs/accelerate/fsdp.yaml: parameters, gradients and optimizer states sharded, like "
            "ZeRO-3) or DDP; see docs/distributed.md"
        )
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise RuntimeError(
            "FSDP version 1: seechat saves and resumes sharded runs through FSDP2's per-parameter shards. "
            "Set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)"
        )


def check_sharded_parts(cfg: RunConfig, acc: Accelerator) -> None:
    """Under FSDP a checkpoint is written from gathered trainable parameters, so every part it
    saves whole must be trainable: a frozen bridge would be saved from rank 0's shard."""
    if acc.distributed_type == DistributedType.FSDP and cfg.trainable.bridge == "frozen":
        raise ValueError(
            "FSDP with trainable.bridge=frozen is not supported: the checkpoint stores the bridge, "
            "which under FSDP is gathered only when it trains. Train it, or use DDP"
        )
    if cfg.train.compile and acc.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "train.compile with FSDP is not supported yet (untested: FSDP2 swaps each layer's parameters "
            "around its forward). Use DDP or a single process, or train.compile=false"
        )
    deep_frozen = cfg.model.fusion == "deep" and cfg.trainable.experts == "frozen"
    if acc.distributed_type == DistributedType.FSDP and deep_frozen:
        raise ValueError(
            "FSDP with model.fusion=deep and trainable.experts=frozen is not supported: the checkpoint "
            "stores the visual experts, which under FSDP are gathered only when they train. Train them, "
            "or use DDP"
        )


def train(cfg: RunConfig, resume: bool = True) -> TrainResult:
    t_start = time.time()
    out = Path(cfg.train.output_dir)
    run_dir, resume_dir = out / "train", out / "train" / "resume"
    # Trackers must know whether this run resumes before the Accelerator starts, so look where a
    # save killed between its renames may have set the resume point aside (recovered just below).
    found = existing(existing(out) / "train" / "resume")
    resuming = resume and (found / "state.json").is_file()
    trackers = build_trackers(
        cfg.train.report_to, run_dir, out.name, _last_saved(found) if resuming else None
    )
    acc = _accelerator(cfg, trackers)
    check_launch(acc)
    check_sharded_parts(cfg, acc)
    if acc.is_main_process:  # a run killed while replacing them left the previous versions aside
        recover(out)
        recover(resume_dir)
    acc.wait_for_everyone()
    torch.manual_seed(cfg.train.seed)

    if cfg.train.compile and cfg.model.fusion == "deep":
        raise ValueError(
            "train.compile with model.fusion=deep is not supported: the visual experts act through forward "
            "hooks on the LM's modules inside a routing scope (seechat.model.fusion), which compiled "
            "layer parts do not follow. Use model.fusion=shallow, or train.compile=false"
        )
    if cfg.train.gradient_checkpointing and cfg.model.fusion == "deep":
        raise ValueError(
            "train.gradient_checkpointing with model.fusion=deep is not supported: the recompute runs in the "
            "backward pass, where the visual experts' routing scope is closed (seechat.model.fusion)"
        )
    model, processor = build_model(cfg)
    model.fused_loss = cfg.train.fused_loss
    if cfg.train.fused_loss and model.loss_head() is None:
        log.info(
            "train.fused_loss: this LM (%s) is not one whose head seechat fuses with the loss "
            "(seechat.model.fused_loss.FUSED_HEAD_LMS), or its head is a LoRA layer: the loss reads "
            "its logits",
            model.language_model.config.get_text_config().model_type,
        )
    if cfg.train.padding_free:
        use_varlen_attention(model.language_model)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model.language_model, cfg.train.checkpoint_every)
    if cfg.train.compile:
        parts = compile_layers(model.language_model)
        log.info("train.compile: %d LM layer parts compile at the first steps, which are slower", parts)
    model.train()
    optimizer = make_optimizer(model, cfg)

    pos = Position()
    state: dict = {}
    if resuming:
        state = read_resume_state(resume_dir)
        if _resume_key(state.get("config", {})) != _resume_key(to_dict(cfg)):
            raise ValueError(
                f"{resume_dir} was written by a different config; pass --no-resume to start over"
            )
    elif acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "run.yaml")
        (run_dir / "metrics.jsonl").write_text("")
        (run_dir / "eval.jsonl").unlink(missing_ok=True)
        reset_tracker_files(run_dir)

    model, optimizer = acc.prepare(model, optimizer)
    if resuming:  # into the prepared model: under FSDP each rank takes its shards of the full tensors
        pos, state = load_resume(resume_dir, model, optimizer)
        log.info("resuming from step %d (%s)", pos.step, resume_dir)
        if acc.is_main_process:
            _truncate_metrics(run_dir / "metrics.jsonl", pos.step)
            _truncate_metrics(run_dir / "eval.jsonl", pos.step)
            truncate_tracker_files(run_dir, pos.step)
    acc.init_trackers(out.name)  # starts them on rank 0 only
    if acc.is_main_process:
        record_config(acc.trackers, run_dir, to_dict(cfg), resumed=resuming)
    ranks_pos = state.get("data_positions", [[pos.epoch, pos.batches_in_epoch]] * acc.num_processes)
    epoch, in_epoch = ranks_pos[acc.process_index]
    spec = StreamSpec(cfg.train.batch_size, cfg.train.seed, acc.process_index, acc.num_processes)
    stream = BatchStream(
        cfg.data,
        processor,
        spec,
        cfg.train.group_by_length,
        epoch,
        in_epoch,
        run_dir / "skipped",
        cfg.train.padding_free,
    )

    bar = tqdm(
        total=cfg.train.max_steps,
        initial=pos.step,
        desc=f"train {out.name}",
        unit="step",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    )
    window = _Window()
    loss_value = float("nan")
    average = cfg.train.loss_average
    while pos.step < cfg.train.max_steps:
        micro = [_next_nonempty(stream) for _ in range(cfg.train.grad_accum)]
        local = torch.tensor(
            [
                sum(count_supervised(b) for b in micro),
                sum(count_samples(b) for b in micro),
                sum(count_tokens(b) for b in micro),
                sum(weighted_count(b["labels"], average, b.get("cu_seq_lens")) for b in micro),
            ],
            dtype=torch.float64,
            device=acc.device,
        )
        totals = acc.reduce(local, reduction="sum").tolist()
        n_items, n_samples, n_tokens = (int(x) for x in totals[:3])
        denominator = totals[3] if average != "token" else n_items  # the token mean: exactly as before
        lr = lr_at(pos.step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro):
            batch = to_device(batch, acc.device)
            sync = i == len(micro) - 1
            with acc.no_sync(model) if not sync else nullcontext(), acc.autocast():
                o = batch_loss(model, batch, average, denominator)
                loss = o.loss * acc.num_processes  # DDP and FSDP average gradients over ranks; undo it
            acc.backward(loss)
            step_loss += o.loss.detach()
        step_loss = acc.reduce(step_loss, reduction="sum")
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            bar.close()
            finish_trackers(acc.trackers)
            raise NonFiniteLossError(
                f"loss became {loss_value} at step {pos.step + 1}; stopped before the optimizer step. "
                f"The last good resume point and checkpoint are in {out} (step {_last_saved(resume_dir)}). "
                "Lower optim.lr, raise optim.warmup_steps, or check the data."
            )
        grad_norm = _clip(acc, model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        pos.samples_seen += n_samples
        pos.tokens_seen += n_items
        window.add(n_samples, n_tokens, n_items)
        bar.update(1)

        if pos.step % cfg.train.log_every == 0 or pos.step == cfg.train.max_steps:
            row = {
                "step": pos.step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                **window.rates(),
                "epoch": stream.epoch,
                "elapsed_s": time.time() - t_start,
            }
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.1f}")
            _record(acc, run_dir / "metrics.jsonl", "train", row)
            window = _Window()

        if cfg.data.eval_paths and (
            pos.step == cfg.train.max_steps or (cfg.train.eval_every and pos.step % cfg.train.eval_every == 0)
        ):
            _record(
                acc,
                run_dir / "eval.jsonl",
                "eval",
                {"step": pos.step, **evaluate(acc, model, processor, cfg)},
            )

        if cfg.train.save_every and pos.step % cfg.train.save_every == 0 and pos.step < cfg.train.max_steps:
            _save(acc, model, processor, optimizer, pos, stream, cfg, out, resume_dir)
    bar.close()

    _save(acc, model, processor, optimizer, pos, stream, cfg, out, resume_dir)
    wall = time.time() - t_start
    finish_trackers(acc.trackers)
    if acc.is_main_process:
        plot_loss_curve(
            run_dir / "metrics.jsonl",
            run_dir / "loss.png",
            title=f"{out.name}",
            eval_metrics=run_dir / "eval.jsonl",
        )
        summary = {
            "status": "done",
            "steps": pos.step,
            "final_loss": loss_value,
            "wall_seconds": wall,
            "samples_seen": pos.samples_seen,
            "tokens_seen": pos.tokens_seen,
            "num_processes": acc.num_processes,
            "distributed_type": acc.distributed_type.value,
            "skipped_samples": _skipped(run_dir / "skipped"),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        log.info(
            "trained %d steps in %.1f s; final loss %.4f; checkpoint %s", pos.step, wall, loss_value, out
        )
    acc.wait_for_everyone()
    return TrainResult(out, pos.step, loss_value, wall)


_MAY_CHANGE_ON_RESUME = (
    "log_every",
    "save_every",
    "eval_every",
    "report_to",
    "gradient_checkpointing",
    "checkpoint_every",
    "compile",
    "fused_loss",
)


def _resume_key(cfg_dict: dict) -> dict:
    """The config fields a resume must not change (logging, saving and evaluation cadence, where
    metrics are reported, activation checkpointing — memory, not the numbers: a run that ran out
    of memory may resume with more of it — and compiling, the same computation in other kernels,
    may change, as may fusing the LM head with the loss, the same sums in another order). A field
    added to the config since the resume point was written takes its default."""
    try:
        cfg_dict = to_dict(from_dict(RunConfig, cfg_dict))
    except (TypeError, ValueError):
        pass  # a field since removed or changed: compared as written, so the mismatch is reported
    train = {k: v for k, v in cfg_dict.get("train", {}).items() if k not in _MAY_CHANGE_ON_RESUME}
    return {**cfg_dict, "train": train}


class _Window:
    """Throughput since the last logged step."""

    def __init__(self):
        self.t0, self.steps, self.samples, self.tokens, self.supervised = time.time(), 0, 0, 0, 0

    def add(self, samples: int, tokens: int, supervised: int) -> None:
        self.steps += 1
        self.samples += samples
        self.tokens += tokens
        self.supervised += supervised

    def rates(self) -> dict[str, float]:
        dt = max(time.time() - self.t0, 1e-9)
        return {
            "samples_per_s": self.samples / dt,
            "tokens_per_s": self.tokens / dt,
            "supervised_tokens_per_step": self.supervised / max(self.steps, 1),
        }


def _record(acc: Accelerator, jsonl: Path, section: str, row: dict) -> None:
    """One metrics row: appended to its JSONL file and sent to the trackers as `section/name`, by rank 0."""
    if acc.is_main_process:
        append_jsonl(jsonl, [row])
    acc.log({f"{section}/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])


def evaluate(acc: Accelerator, model: torch.nn.Module, processor, cfg: RunConfig) -> dict[str, float]:
    """Held-out loss over data.eval_paths: summed token loss / supervised tokens, over all ranks.
    Every rank must call it (the forwards and the reduction are collective under DDP / FSDP)."""
    t0 = time.time()
    spec = StreamSpec(cfg.train.batch_size, cfg.train.seed, acc.process_index, acc.num_processes)
    totals = torch.zeros(3, dtype=torch.float64, device=acc.device)  # summed loss, supervised tokens, samples
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(cfg.data, processor, spec, cfg.train.eval_batches, cfg.train.padding_free):
            batch = to_device(batch, acc.device)
            with acc.autocast():
                o = model(**batch, num_items_in_batch=1, return_logits=False)  # divided by 1: the sum
            totals += torch.tensor(
                [float(o.loss), count_supervised(batch), count_samples(batch)],
                dtype=torch.float64,
                device=acc.device,
            )
    model.train()
    loss_sum, tokens, samples = acc.reduce(totals, reduction="sum").tolist()
    if not tokens:
        raise ValueError(f"data.eval_paths={list(cfg.data.eval_paths)} gave no usable sample to evaluate")
    return {
        "loss": loss_sum / tokens,
        "supervised_tokens": int(tokens),
        "samples": int(samples),
        "seconds": time.time() - t0,
    }


MAX_EMPTY_BATCHES = 50


def _next_nonempty(stream: BatchStream) -> dict:
    """The next micro-batch with at least one usable sample; a stream of only unusable samples
    (unreadable images, nothing supervised) is an error rather than an endless loop."""
    for _ in range(MAX_EMPTY_BATCHES):
        batch = next(stream)
        if batch:
            return batch
    raise ValueError(
        f"{MAX_EMPTY_BATCHES} micro-batches in a row had no usable sample (see the warnings above: "
        "unreadable images — is data.image_root right? — or no supervised token)"
    )


def _clip(acc: Accelerator, model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (across ranks and FSDP shards); returns it before clipping."""
    if not max_norm:
        return 0.0
    norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _save(acc, model, processor, optimizer, pos, stream, cfg, out: Path, resume_dir: Path) -> None:
    """Checkpoint + resume point. Every rank gathers (FSDP shards travel to rank 0); rank 0 writes."""
    pos.epoch, pos.batches_in_epoch = stream.epoch, stream.batches_in_epoch
    positions = acc.gather(torch.tensor([[stream.epoch, stream.batches_in_epoch]], device=acc.device))
    state = gather_training_state(model, optimizer)
    if acc.is_main_process:
        extra = {"config": to_dict(cfg), "data_positions": positions.cpu().tolist()}
        # the gathered values, not the live parameters: under FSDP those are shards
        write_checkpoint(acc.unwrap_model(model), processor, out, keep=("train",), state=state.params)
        save_resume(resume_dir, state, pos, extra)
    acc.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the resume point: they will be produced again."""
    if path.is_file():
        # crash-safe: a kill mid-write must not empty the run's history
        write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step])


def _last_saved(resume_dir: Path) -> int:
    try:
        return json.loads((resume_dir / "state.json").read_text())["position"]["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _skipped(directory: Path) -> dict:
    if not directory.is_dir():
        return {"count": 0, "keys": []}
    keys = []
    for f in sorted(directory.glob("*.jsonl")):
        keys += [row.get("key") for row in read_jsonl(f)]
    return {"count": len(keys), "keys": keys[:100]}
