"""Training-step throughput of the reference recipes on one accelerator: the rate a GPU consumes.

Builds the reference architectures with random weights (speed does not depend on weight values):
Chinese-CLIP ViT-L/14 @ 336 px (`ChineseCLIPVisionModel`) + Qwen2.5-7B (`Qwen2ForCausalLM`) +
a Q-Former bridge (32 queries), stitched by seechat's own `SeeChatModel` and made trainable by
seechat's own `apply_trainable`, in bf16, then times full training steps (forward, backward,
AdamW step) on synthetic batches of the recipe's shapes:

- stage 1: vision and LM frozen, bridge trained (the gradient still flows back through the 7B LM's
  activations to the bridge). A sample = one image + `--s1-text` text tokens (a short caption).
- stage 2: bridge + LM trained (full), gradient checkpointing on (every layer; `--s2-checkpoint-every`
  times selective checkpointing too, `train.checkpoint_every`). A sample = one image +
  `--s2-text` text tokens. Pure bf16 here (weights, grads and AdamW moments, ~60 GB for 7B on one
  card); accelerate's bf16 mixed precision keeps fp32 master weights and moments, which FSDP /
  ZeRO shard over 8 GPUs — memory differs, the compute per sample is the same.
  `--s2-text-range LO,HI` gives the samples different lengths (as real conversations have), and
  `--s2-padding-free 0,1` times them right-padded and padding-free (`train.padding_free`, the LM on
  seechat's varlen attention); MFU then counts the real tokens only, so padding shows as lost MFU.
  `--grad-accum N` takes N micro-batches per optimizer step, as the recipes do (4): a step with one
  micro-batch also pays a whole AdamW pass over the 7B parameters.
- `--peer` (with an mlp2x_gelu preset: `reference-mlp`, LLaVA-1.5's shape with 576 image tokens)
  times each row a second time through transformers' `LlavaForConditionalGeneration` in a plain
  loop — forward with `labels` (logits at every position, then the loss), backward, AdamW — built
  around the same modules (`seechat.model.export.llava_view`: the same weights, trainable
  parameters, batch, precision and checkpointing), on the padded batch: what a user would run
  without seechat.
- `--compile` compiles each LM layer's norms, attention and MLP first (`train.compile`,
  `seechat.model.build.compile_layers`); the warm-up steps then include the compiling, which is
  not timed. Not with `--peer` (the peer shares the modules).

Reported: samples (= images) / s per GPU, tokens / s, achieved model TFLOP/s and MFU against the
card's dense bf16 peak (`--peak-tflops`). Model FLOPs per sample, with N_lm the LM's parameters
(embedding excluded, LM head included), N_v the vision tower's, T the sequence length, P the
vision tokens per image; attention's T^2 terms are left out (T <= 1 k here):

    stage 1: 2 N_v P (vision fwd) + 2 N_lm T (LM fwd) + 2 N_lm T (LM backward, input grads only)
    stage 2: 2 N_v P + 6 N_lm T            (recomputation by checkpointing is not counted)

    python benchmarks/bench_train_step.py --preset reference      # on a GPU
    python benchmarks/bench_train_step.py --preset reference-mlp --peer   # seechat vs transformers' LLaVA
    python benchmarks/bench_train_step.py --preset tiny --device cpu --steps 2  # a smoke run
    python benchmarks/bench_train_step.py --preset reference-mlp --peer --layers 1 --device cpu \
        --steps 1 --warmup 1 --s1-batches 2 --s2-batches 1   # the same shapes, 1 layer, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    ChineseCLIPVisionConfig,
    ChineseCLIPVisionModel,
    PretrainedConfig,
    Qwen2Config,
)

from seechat.config import (  # noqa: E402
    BridgeConfig,
    LoraConfig,
    ModelConfig,
    TrainableConfig,
    VisionConfig,
    load_config,
)
from seechat.data.collate import collate, collate_padding_free  # noqa: E402
from seechat.data.processor import Encoded  # noqa: E402
from seechat.model.bridges import build_bridge  # noqa: E402
from seechat.model.build import apply_trainable, compile_layers, enable_activation_checkpointing  # noqa: E402
from seechat.model.export import ExportError, llava_inputs, llava_view  # noqa: E402
from seechat.model.modeling import SeeChatModel  # noqa: E402
from seechat.model.sizes import expert_config, with_layers  # noqa: E402
from seechat.model.varlen import use_varlen_attention  # noqa: E402
from seechat.model.vision import VisionTower  # noqa: E402


@dataclass(frozen=True)
class Preset:
    vision: ChineseCLIPVisionConfig
    lm: PretrainedConfig
    bridge: BridgeConfig


REFERENCE_RECIPE = ROOT / "configs" / "reference" / "stage1_qformer_qwen2.5-7b.yaml"
REFERENCE_MLP_RECIPE = ROOT / "configs" / "reference" / "stage1_mlp_qwen2.5-7b.yaml"


def reference_preset(recipe: Path = REFERENCE_RECIPE) -> Preset:
    """The recipe's experts and bridge, shapes from `seechat.model.sizes` (the registry `seechat
    estimate` sizes runs with; nothing is downloaded): ViT-L/14 @ 336 px + Qwen2.5-7B + Q-Former.
    The H200 rows in benchmarks/RESULTS.md were timed with these shapes written out here."""
    model = load_config(recipe).model
    return Preset(
        vision=expert_config(model.vision.path), lm=expert_config(model.lm.path), bridge=model.bridge
    )


def tiny_preset() -> Preset:
    return Preset(
        vision=ChineseCLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        ),
        lm=Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        bridge=BridgeConfig(type="qformer", num_queries=8, num_layers=2, num_heads=4, hidden_size=64),
    )


def tiny_mlp_preset() -> Preset:
    """tiny, with LLaVA-1.5's projector (the bridge transformers' LLaVA has, for --peer)."""
    return replace(tiny_preset(), bridge=BridgeConfig(type="mlp2x_gelu"))


PRESETS = {
    "reference": reference_preset,
    "reference-mlp": lambda: reference_preset(REFERENCE_MLP_RECIPE),  # 576 image tokens, LLaVA-shaped
    "tiny": tiny_preset,
    "tiny-mlp": tiny_mlp_preset,
}
IMAGE_TOKEN_ID = 7  # any id inside the vocabulary: the synthetic batches place it themselves


def build(preset: Preset, device: torch.device, dtype: torch.dtype) -> SeeChatModel:
    cfg = ModelConfig(
        vision=VisionConfig(feature_layer=-2, select="patch"),
        bridge=preset.bridge,
        dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in bf16: a 7B model never exists in fp32
    try:
        with torch.device(device):
            vision = ChineseCLIPVisionModel(preset.vision)
            lm = AutoModelForCausalLM.from_config(preset.lm, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(default)
    tower = VisionTower(vision, cfg.vision)
    bridge = build_bridge(cfg.bridge, tower.hidden_size, lm.config.hidden_size, tower.num_features).to(
        device, dtype
    )
    return SeeChatModel(cfg, tower, bridge, lm, IMAGE_TOKEN_ID)


def count(module: torch.nn.Module, skip_embeddings: bool = False) -> int:
    emb = module.get_input_embeddings().weight.numel() if skip_embeddings else 0
    return sum(p.numel() for p in module.parameters()) - emb


def batch(model: SeeChatModel, texts: list[int], device: torch.device, padding_free: bool = False) -> dict:
    """One sample per entry of `texts` (an image + that many text tokens, the first third of them
    an unsupervised prompt), laid out by seechat's own collate: right-padded, or padding-free."""
    n_img = model.num_image_tokens
    vocab = model.language_model.config.vocab_size
    size = model.vision_tower.image_size
    samples = []
    for text in texts:
        ids = torch.randint(100, vocab, (n_img + text,))
        ids[:n_img] = IMAGE_TOKEN_ID
        labels = ids.clone()
        labels[: n_img + text // 3] = -100  # the prompt part is not supervised
        samples.append(Encoded(ids, labels, torch.randn(1, 3, size, size)))
    data = collate_padding_free(samples) if padding_free else collate(samples, pad_id=0)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}


def sample_texts(b: int, text: int, text_range: tuple[int, int] | None, seed: int) -> list[int]:
    """Each sample's text tokens: `text` for all, or drawn uniformly from `text_range` (seeded)."""
    if text_range is None:
        return [text] * b
    g = torch.Generator().manual_seed(seed)
    return torch.randint(text_range[0], text_range[1] + 1, (b,), generator=g).tolist()


def seechat_loss(model: SeeChatModel):
    """seechat's training forward: the loss-only forward the loop runs (the LM head fused with the
    loss, at supervised positions only), padded or padding-free."""
    return lambda data: model(**data, return_logits=False).loss


def llava_loss(llava):
    """The peer: transformers' LLaVA called as a plain loop would (`labels` given: logits at every
    position, then the loss), on the padded batch."""
    return lambda data: llava(**llava_inputs(llava, data)).loss


def time_steps(
    loss_fn, params: list, data: dict, steps: int, warmup: int, device: torch.device, grad_accum: int = 1
) -> float:
    """Seconds per optimizer step: `grad_accum` micro-batches forward and backward, then AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        for _ in range(grad_accum):
            loss_fn(data).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t0) / steps


def run_stage(
    name: str,
    model: SeeChatModel,
    trainable: TrainableConfig,
    checkpoint_every: int,
    batches: list[int],
    text: int,
    args,
    device: torch.device,
    flops_per_token,
    text_range: tuple[int, int] | None = None,
    padding_free: bool = False,
    llava=None,
) -> list[dict]:
    """Time each batch size; `flops_per_token(t)` gives a t-token sample's model FLOPs. With
    `text_range` the samples' lengths differ, and only their real tokens count as work (the padding
    of a padded batch is computed but not counted). With `llava` (`llava_view` of the same model:
    the same modules and trainable parameters), each batch size is timed a second time through
    transformers' LLaVA in a plain loop, on the padded batch."""
    apply_trainable(model, trainable)
    lm = model.language_model
    if padding_free:
        use_varlen_attention(lm)
    elif lm.config._attn_implementation != "sdpa":
        lm.set_attn_implementation("sdpa")
    lm.activation_checkpointing_disable()
    recomputed = enable_activation_checkpointing(lm, checkpoint_every) if checkpoint_every else 0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    impls = [("seechat", seechat_loss(model), padding_free)]
    if llava is not None:
        impls.append(("transformers-llava", llava_loss(llava.train()), False))

    def time_row(impl: str, loss_fn, free: bool, b: int, texts: list[int]) -> dict:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seqs = [model.num_image_tokens + t for t in texts]
        row = {
            "stage": name,
            "impl": impl,
            "batch": b,
            "grad_accum": args.grad_accum,
            "checkpoint_every": checkpoint_every,
            "recomputed_layers": recomputed,
            "padding_free": free,
            "text_range": list(text_range) if text_range else None,
            "compiled": args.compile,
        }
        try:
            data = batch(model, texts, device, free)
            dt = time_steps(loss_fn, params, data, args.steps, args.warmup, device, args.grad_accum)
        except torch.OutOfMemoryError:
            return {**row, "error": "out of memory"}
        finally:
            for p in params:
                p.grad = None
        tflops = args.grad_accum * sum(flops_per_token(t) for t in seqs) / dt / 1e12
        row |= {
            "seq_len": max(seqs),
            "mean_seq_len": round(sum(seqs) / b, 1),
            "padding": 0.0 if free else round(1 - sum(seqs) / (b * max(seqs)), 3),
            "step_s": round(dt, 4),
            "samples_per_s": round(args.grad_accum * b / dt, 1),
            "tokens_per_s": round(args.grad_accum * sum(seqs) / dt),
            "model_tflops": round(tflops, 1),
            "mfu": round(tflops / args.peak_tflops, 3),
        }
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        return row

    rows = []
    for b in batches:
        texts = sample_texts(b, text, text_range, seed=b)
        timed = [time_row(impl, loss_fn, free, b, texts) for impl, loss_fn, free in impls]
        for row in timed:
            print(json.dumps(row), flush=True)
        rows += timed
        if any("error" in r for r in timed):
            break
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--layers",
        type=int,
        default=0,
        help="keep the preset's widths, heads, vocabulary and image size but build only this many layers "
        "per tower, in bf16 on any device: a CPU rehearsal of the full-size shapes (default 0: every layer)",
    )
    ap.add_argument("--s1-batches", default="32,64,128", help="stage-1 per-GPU batch sizes to time")
    ap.add_argument("--s2-batches", default="4,8", help="stage-2 per-GPU batch sizes to time")
    ap.add_argument(
        "--s2-checkpoint-every",
        default="1",
        help="stage 2's activation checkpointing to time, comma-separated: k recomputes every k-th LM "
        "layer (train.checkpoint_every), 0 none; e.g. 1,2,0",
    )
    ap.add_argument(
        "--s1-text", type=int, default=48, help="text tokens per stage-1 sample (template + caption)"
    )
    ap.add_argument(
        "--s2-text", type=int, default=480, help="text tokens per stage-2 sample (a conversation)"
    )
    ap.add_argument(
        "--s2-text-range",
        default="",
        help="LO,HI: stage-2 samples of different lengths instead, text tokens drawn uniformly from "
        "[LO, HI] (seeded); only real tokens count as work",
    )
    ap.add_argument(
        "--s2-padding-free",
        default="0",
        help="stage-2 layouts to time, comma-separated: 0 right-padded, 1 padding-free "
        "(train.padding_free, seechat.model.varlen); e.g. 0,1",
    )
    ap.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (train.grad_accum; the reference recipes use 4): the "
        "optimizer's share of a step shrinks as in training",
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200 SXM: 989)"
    )
    ap.add_argument("--stages", default="1,2")
    ap.add_argument(
        "--peer",
        action="store_true",
        help="also time transformers' LlavaForConditionalGeneration in a plain loop (forward with labels, "
        "backward, AdamW) built around the same modules: same weights, trainable parameters, batch, "
        "precision and checkpointing. Needs an mlp2x_gelu preset (reference-mlp, tiny-mlp)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each LM layer's norms, attention and MLP first (train.compile); the "
        "compiling happens in the warm-up steps",
    )
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.compile and args.peer:
        ap.error("--compile compiles the modules --peer shares: time them in separate runs")
    device = torch.device(args.device)
    if args.layers < 0:
        ap.error("--layers must be >= 1 (or 0: every layer)")
    dtype = torch.bfloat16 if device.type == "cuda" or args.layers else torch.float32
    torch.manual_seed(0)
    t0 = time.time()
    preset = PRESETS[args.preset]()
    if args.layers:
        preset = replace(
            preset, vision=with_layers(preset.vision, args.layers), lm=with_layers(preset.lm, args.layers)
        )
    model = build(preset, device, dtype)
    llava = None
    if args.peer:
        try:
            llava = llava_view(model, stop_token_ids=[], pad_token_id=0)
        except ExportError as e:
            ap.error(f"--peer with --preset {args.preset}: {e}")
    if args.compile:
        compile_layers(model.language_model)
    n_v, n_lm = count(model.vision_tower.model), count(model.language_model, skip_embeddings=True)
    p = model.vision_tower.num_features
    info = {
        "preset": args.preset,
        "layers": preset.lm.num_hidden_layers,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "vision_params": n_v,
        "lm_params_no_embedding": n_lm,
        "bridge_params": count(model.bridge),
        "vision_tokens": p,
        "image_tokens": model.num_image_tokens,
        "build_s": round(time.time() - t0, 1),
        "compiled": args.compile,
        "fused_loss": model.loss_head() is not None,  # seechat's rows: the head fused with the loss
    }
    print(json.dumps(info), flush=True)
    rows: list[dict] = []

    def save(rows: list[dict]) -> None:  # after every stage: a run cut short by a time limit keeps its rows
        if args.json:
            Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    stages = {s.strip() for s in args.stages.split(",")}
    if "1" in stages:
        rows += run_stage(
            "stage1",
            model,
            TrainableConfig(vision="frozen", bridge="full", lm="frozen"),
            0,
            [int(x) for x in args.s1_batches.split(",")],
            args.s1_text,
            args,
            device,
            lambda t: 2 * n_v * p + 4 * n_lm * t,
            llava=llava,
        )
        save(rows)
    if "2" in stages:
        text_range = tuple(int(x) for x in args.s2_text_range.split(",")) if args.s2_text_range else None
        for i, free in enumerate(bool(int(x)) for x in args.s2_padding_free.split(",")):
            for every in (int(x) for x in args.s2_checkpoint_every.split(",")):
                rows += run_stage(
                    "stage2",
                    model,
                    TrainableConfig(vision="frozen", bridge="full", lm="full", lora=LoraConfig()),
                    every,
                    [int(x) for x in args.s2_batches.split(",")],
                    args.s2_text,
                    args,
                    device,
                    lambda t: 2 * n_v * p + 6 * n_lm * t,
                    text_range,
                    free,
                    llava=llava if i == 0 else None,  # the peer pads: once, with the first layout
                )
                save(rows)
    save(rows)
    return rows


if __name__ == "__main__":
    main()
