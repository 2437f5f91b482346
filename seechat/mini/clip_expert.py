"""The mini Chinese-CLIP: transformers' `ChineseCLIPModel` at toy size, trained contrastively.

A small BERT text tower and a ViT over 64-px images (8-px patches: an 8x8 grid), a project-built
`BertTokenizerFast` (a `vocab.txt` of `seechat.mini.scene_text.charset()`, every character any mini world
writes; BERT's basic tokenizer splits CJK per character) and a 64-px `ChineseCLIPImageProcessor`, all
saved together in one `save_pretrained` folder. Its vision half is the mini vision expert
(`VisionConfig(path=clip_dir)`); the whole model is the mini relevance scorer
(`seechat.data.scorer.ChineseClipScorer.from_pretrained(clip_dir)`).

Every step draws fresh scenes (`seechat.mini.fresh`): no image is shown twice. The objective is
CLIP's symmetric InfoNCE with learnable temperature, twice, plus a box term:

- **image-caption**: the pooled image embedding against a freshly phrased concise or detailed
  caption of each image (drawn from the scene's ground truth each step, `seechat.mini.scene_text`). A text
  true of several images in the batch (identical concise captions) counts them all as positives.
- **region-phrase**: each object's box-weighted mean of the *feature layer's* patch tokens (the
  layer stitching reads, `feature_layer=-2`), through the same post-LayerNorm and projection,
  against a phrase naming its size, colour, shape and (half the time) grid cell — RegionCLIP-style
  grounded pairs. Why: random in-batch negatives almost always differ in colour or count already,
  so an image-level loss alone barely needs shape and never *where*; measured on this world, even at
  4x the budget it told a true caption from a shape-swapped one only 54 % of the time. The region
  term makes every object's patches carry its attributes — what the stitched model's bridge reads —
  and removes the long loss plateau at the start. It is weighted 4x: at the old 175-step budget that
  lifted zero-shot region shape accuracy from 75 % to 81 % for about the same caption retrieval.
- **box** (OWL-ViT-style box head): a linear head on every feature-layer patch regresses the box of
  the object covering most of that patch (smooth L1, in image fractions); the head is dropped after
  training. Grounding asks the stitched model for exact boxes, and this makes them linearly readable
  from the patches the bridge reads (`box_probe`: 99.9 % of val objects at IoU >= 0.5).

`text_init_std=0.1` (BERT uses 0.02): at 0.02 every text's [CLS] output starts at cosine 0.9999
with every other, and the image-caption loss sits on a plateau for a third of the budget.

Not here: the shared recipe plumbing (`seechat.mini.expert_training`), the scorer
(`seechat.data.scorer`), stitching (`seechat.model`).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BertTokenizerFast,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    PreTrainedTokenizerBase,
)
from transformers.models.chinese_clip import ChineseCLIPImageProcessorPil

from seechat.eval.grounding import box_iou
from seechat.mini import scene_text
from seechat.mini.expert_training import (
    PathLike,
    done_marker,
    load_pixels,
    pair_meta,
    read_jsonl,
    run_atomic,
    torch_threads,
    train_loop,
)
from seechat.mini.fresh import fresh_scenes, render_batch, step_batches, step_rng
from seechat.mini.scenes import COLOURS, SHAPES, SIZES, Scene, fingerprint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics, as Chinese-CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class ClipRecipe:
    """Mini Chinese-CLIP sizes and optimisation (the shipped CLIP: `seechat.mini.shipped`)."""

    image_size: int = 64
    patch_size: int = 8  # 64 px / 8 = an 8x8 grid of patches
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_length: int = 128  # text positions; the longest detailed caption is ~110 characters
    projection_dim: int = 128
    text_init_std: float = 0.1  # BERT's 0.02 starts every [CLS] output at the same vector
    detailed_fraction: float = 0.2  # share of captions that are detailed (positions, sizes, relations)
    region_weight: float = 4.0  # weight of the region-phrase loss (what the stitched model reads)
    region_position_prob: float = 0.5  # share of region phrases that also name the grid cell
    box_weight: float = 1.0  # weight of the per-patch box regression (OWL-ViT-style box head)
    feature_layer: int = -2  # the hidden_states index the region and box losses train: what stitching reads
    steps: int = 2800  # the shipped CLIP: 268 s on one H200, shared with the LM run
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10


# --------------------------------------------------------------------------- tokenizer, processor, config


def build_clip_tokenizer(chars: list[str], max_length: int, directory: PathLike) -> BertTokenizerFast:
    """Write `directory/vocab.txt` (BERT specials + `chars`) and load it as a BERT WordPiece
    tokenizer, exactly as a hub Chinese-CLIP's `vocab.txt` loads.

    CJK text splits per character and punctuation is cut off; Latin letters and digits stay glued
    into words, so their `##` continuation pieces are in the vocabulary too.
    """
    vocab = list(BERT_SPECIALS) + [c for c in chars if not c.isspace()]
    vocab += [f"##{c}" for c in chars if c.isascii() and c.isalnum()]
    (Path(directory) / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(directory, do_lower_case=False, model_max_length=max_length)


def build_clip_image_processor(image_size: int) -> ChineseCLIPImageProcessorPil:
    return ChineseCLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> model input; equal to the image processor's output for images already
    at the model's size (its resize and centre crop are then the identity)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def clip_config(recipe: ClipRecipe, vocab_size: int) -> ChineseCLIPConfig:
    text_cfg = dict(
        vocab_size=vocab_size,
        hidden_size=recipe.text_hidden,
        intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        max_position_embeddings=recipe.max_text_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=recipe.text_init_std,
    )
    vision_cfg = dict(
        hidden_size=recipe.vision_hidden,
        intermediate_size=4 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        projection_dim=recipe.projection_dim,
    )
    return ChineseCLIPConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        projection_dim=recipe.projection_dim,
        initializer_range=recipe.text_init_std,
    )


# --------------------------------------------------------------------------- data and batches


@dataclass(frozen=True)
class _ClipBatch:
    texts: list[str]  # (B,) one caption per image
    positive: torch.Tensor  # (B, B) bool: caption t is true of image j
    phrases: list[str]  # (R,) one phrase per object of the batch, e.g. "左上角的大的红色圆形"
    region_image: torch.Tensor  # (R,) long: the batch image each object is in
    region_weights: torch.Tensor  # (R, P) float: each object's share of each patch; rows sum to 1
    region_positive: torch.Tensor  # (R, R) bool: phrase r is true of object q
    patch_boxes: (
        torch.Tensor
    )  # (B, P, 4) float: box (x1, y1, x2, y2) / image size of the object a patch shows
    patch_has_box: torch.Tensor  # (B, P) bool: an object covers at least a quarter of the patch


def _captions(scenes: list[Scene], rng: random.Random, recipe: ClipRecipe) -> dict[str, Any]:
    """A concise or detailed caption per image; a caption is true of every image with its meaning
    (the canonical caption for concise ones, the scene fingerprint for detailed ones)."""
    detailed = [rng.random() < recipe.detailed_fraction for _ in scenes]
    texts = [
        scene_text.detailed_caption(s, rng) if d else scene_text.concise_caption(s, rng)
        for s, d in zip(scenes, detailed, strict=True)
    ]
    canonical, meaning = [scene_text.concise_caption(s) for s in scenes], [fingerprint(s) for s in scenes]
    keys = [m if d else c for c, m, d in zip(canonical, meaning, detailed, strict=True)]
    positive = torch.tensor(
        [
            [key == (meaning[j] if d else canonical[j]) for j in range(len(scenes))]
            for key, d in zip(keys, detailed, strict=True)
        ]
    )
    return {"texts": texts, "positive": positive}


def patch_areas(bbox: tuple[int, int, int, int], image_size: int, patch_size: int) -> torch.Tensor:
    """(P,) pixels of a box (x1, y1, x2, y2; half-open) inside each patch, row-major."""
    edges = torch.arange(0, image_size + 1, patch_size, dtype=torch.float)  # (G+1,)
    x1, y1, x2, y2 = (torch.tensor(float(v)) for v in bbox)
    wx = (torch.minimum(edges[1:], x2) - torch.maximum(edges[:-1], x1)).clamp(min=0)  # (G,)
    wy = (torch.minimum(edges[1:], y2) - torch.maximum(edges[:-1], y1)).clamp(min=0)  # (G,)
    return (wy[:, None] * wx[None, :]).flatten()  # (G, G) flattened, rows are y


def patch_weights(bbox: tuple[int, int, int, int], image_size: int, patch_size: int) -> torch.Tensor:
    """(P,) share of a pixel box in each patch, row-major, summing to 1."""
    w = patch_areas(bbox, image_size, patch_size)
    return w / w.sum()


def patch_box_targets(scene: Scene, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch, the box of the object covering most of it, / image size: (P, 4), and whether that
    object covers at least a quarter of the patch: (P,) bool."""
    n = scene.image_size
    grid = (n // patch_size) ** 2
    if not scene.objects:
        return torch.zeros(grid, 4), torch.zeros(grid, dtype=torch.bool)
    areas = torch.stack([patch_areas(o.bbox, n, patch_size) for o in scene.objects])  # (O, P)
    best, which = areas.max(0)  # (P,)
    boxes = torch.tensor([o.bbox for o in scene.objects], dtype=torch.float) / n  # (O, 4)
    return boxes[which], best >= patch_size * patch_size / 4


def _regions(scenes: list[Scene], rng: random.Random, recipe: ClipRecipe) -> dict[str, Any]:
    phrases, image, weights, facts, claims = [], [], [], [], []
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            named_cell = rng.random() < recipe.region_position_prob
            phrases.append(
                scene_text.phrase(
                    o.shape, o.colour, o.size, scene_text.LOCATIVE[o.position] if named_cell else None
                )
            )
            image.append(b)
            weights.append(patch_weights(o.bbox, recipe.image_size, recipe.patch_size))
            facts.append((o.shape, o.colour, o.size, o.position))
            claims.append((o.shape, o.colour, o.size, o.position if named_cell else None))
    positive = torch.tensor([[c[:3] == f[:3] and c[3] in (None, f[3]) for f in facts] for c in claims])
    boxes, has_box = zip(*(patch_box_targets(s, recipe.patch_size) for s in scenes), strict=True)
    return {
        "phrases": phrases,
        "region_image": torch.tensor(image),
        "region_weights": torch.stack(weights),
        "region_positive": positive,
        "patch_boxes": torch.stack(boxes),
        "patch_has_box": torch.stack(has_box),
    }


def clip_batch(recipe: ClipRecipe, step: int) -> tuple[torch.Tensor, _ClipBatch]:
    """Step `step`'s fresh scenes: uint8 pixels (B, 3, H, W) and what the losses compare them with."""
    rng = step_rng("clip", recipe.seed, step)
    scenes = fresh_scenes(rng, recipe.batch_size, recipe.image_size)
    return render_batch(scenes), _ClipBatch(**_captions(scenes, rng, recipe), **_regions(scenes, rng, recipe))


# --------------------------------------------------------------------------- model pieces


def clip_loss(logits_per_text: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with multi-positive targets (uniform over positives).

    logits_per_text (T, N) and positive (T, N) bool; every row and column has a positive.
    """
    target = positive.float()
    t2i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits_per_text, 1)).sum(1)
    i2t = -(target.T / target.T.sum(1, keepdim=True) * F.log_softmax(logits_per_text.T, 1)).sum(1)
    return (t2i.mean() + i2t.mean()) / 2


def text_embeds(
    model: ChineseCLIPModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], chunks: int = 3
) -> torch.Tensor:
    """Projected, unnormalised (T, D) text embeddings. Each distinct text is encoded once (object
    phrases repeat within a batch), in length-sorted chunks so that short phrases are not padded to
    the longest detailed caption."""
    unique = sorted(set(texts), key=lambda t: (len(t), t))  # not set order: it varies by process
    size = math.ceil(len(unique) / chunks)
    limit = model.config.text_config.max_position_embeddings
    parts = []
    for c in range(0, len(unique), size):
        tokens = tokenizer(
            unique[c : c + size], padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        tokens = tokens.to(model.device)
        parts.append(model.get_text_features(**tokens).pooler_output)
    row = {t: i for i, t in enumerate(unique)}
    return torch.cat(parts)[torch.tensor([row[t] for t in texts], device=model.device)]


def region_embeds(
    model: ChineseCLIPModel, hidden: torch.Tensor, image: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Objects' box-weighted patch features through the image embedding's post-LayerNorm and
    projection: hidden (B, 1 + P, D_v), image (R,), weights (R, P) -> (R, D), normalised."""
    pooled = torch.einsum("rp,rpd->rd", weights, hidden[:, 1:][image])  # (R, D_v): CLS dropped
    return F.normalize(model.visual_projection(model.vision_model.post_layernorm(pooled)), dim=-1)


# --------------------------------------------------------------------------- training


def _clip_train(recipe: ClipRecipe, out: Path, device: str, workers: int) -> dict[str, Any]:
    tokenizer = build_clip_tokenizer(scene_text.charset(), recipe.max_text_length, out)
    torch.manual_seed(recipe.seed)
    model = ChineseCLIPModel(clip_config(recipe, len(tokenizer))).to(device).train()
    # The box head reads the feature layer as the bridge will, then is dropped: it only shapes the features.
    box_head = torch.nn.Linear(recipe.vision_hidden, 4).to(device)
    batches = step_batches(functools.partial(clip_batch, recipe), recipe.steps, workers)

    def loss_at(step: int) -> torch.Tensor:
        pixels, batch = next(batches)
        scale = model.logit_scale.exp()
        vision = model.get_image_features(
            pixel_values=normalize_pixels(pixels).to(device), output_hidden_states=True
        )
        images = F.normalize(vision.pooler_output, dim=-1)  # (B, D)
        texts = F.normalize(text_embeds(model, tokenizer, batch.texts + batch.phrases), dim=-1)  # (B + R, D)
        captions, phrases = texts[: len(pixels)], texts[len(pixels) :]
        hidden = vision.hidden_states[recipe.feature_layer]  # (B, 1 + P, D_v)
        regions = region_embeds(
            model, hidden, batch.region_image.to(device), batch.region_weights.to(device)
        )  # (R, D)
        has_box = batch.patch_has_box.to(device)
        box_err = F.smooth_l1_loss(
            box_head(hidden[:, 1:])[has_box], batch.patch_boxes.to(device)[has_box], beta=0.02
        )
        return (
            clip_loss(scale * captions @ images.T, batch.positive.to(device))
            + recipe.region_weight * clip_loss(scale * phrases @ regions.T, batch.region_positive.to(device))
            + recipe.box_weight * box_err / 0.02
        )

    def clamp_temperature() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: logit scale at most 100

    params = list(model.parameters()) + list(box_head.parameters())
    stats = train_loop("mini-clip", out, params, recipe, loss_at, clamp_temperature)
    model.to("cpu").eval().half().save_pretrained(out)
    # processor_config.json + tokenizer + preprocessor_config.json: AutoProcessor, AutoTokenizer and
    # AutoImageProcessor all load from this one folder.
    ChineseCLIPProcessor(
        image_processor=build_clip_image_processor(recipe.image_size), tokenizer=tokenizer
    ).save_pretrained(out)
    return {
        **stats,
        "logit_scale": model.logit_scale.exp().item(),
        "images_seen": recipe.steps * recipe.batch_size,
        "device": device,
    }


def train_mini_clip(
    out_dir: PathLike,
    recipe: ClipRecipe = ClipRecipe(),
    *,
    force: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    workers: int = 0,
) -> Path:
    """Train the mini Chinese-CLIP on fresh scenes into `out_dir` (returned; fp16 weights).

    Skipped when `out_dir/done.json` records the same recipe and world generators, unless `force`.
    `threads`: torch intra-op threads (default: all cores, at most 8); `workers`: background
    processes that render the batches (each is a pure function of the step).
    """
    out = Path(out_dir)
    with torch_threads(threads):
        return run_atomic(
            out, done_marker(recipe), force, lambda tmp: _clip_train(recipe, tmp, device, workers)
        )


# --------------------------------------------------------------------------- evaluation


def _retrieval(
    images: torch.Tensor, texts: torch.Tensor, truth: list[str], captions: list[str]
) -> dict[str, float]:
    """Top-1 both ways; a retrieved caption (image) counts when its text equals the truth's."""
    sim = images @ texts.T  # (N_images, N_captions)
    i2t = [captions[j] == t for j, t in zip(sim.argmax(1).tolist(), truth, strict=True)]
    t2i = [truth[i] == c for i, c in zip(sim.argmax(0).tolist(), captions, strict=True)]
    return {"i2t_top1": sum(i2t) / len(i2t), "t2i_top1": sum(t2i) / len(t2i)}


def _region_attributes(
    model: ChineseCLIPModel, tokenizer: PreTrainedTokenizerBase, hidden: torch.Tensor, scenes: list[Scene]
) -> dict[str, float]:
    """Zero-shot attribute accuracy of each object's feature-layer region: its phrase against the
    phrases that differ from it only in shape (colour, size)."""
    objects = [(b, o) for b, s in enumerate(scenes) for o in s.objects]
    vc = model.config.vision_config
    regions = region_embeds(
        model,
        hidden,
        torch.tensor([b for b, _ in objects]),
        torch.stack([patch_weights(o.bbox, vc.image_size, vc.patch_size) for _, o in objects]),
    )
    result = {}
    for attr, values in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", SIZES)):
        phrases = [
            scene_text.phrase(**{"shape": o.shape, "colour": o.colour, "size": o.size, attr: v})
            for _, o in objects
            for v in values
        ]
        candidates = F.normalize(text_embeds(model, tokenizer, phrases), dim=-1).view(
            len(objects), len(values), -1
        )
        picked = torch.einsum("rd,rvd->rv", regions, candidates).argmax(1).tolist()
        result[f"region_{attr}"] = sum(
            values[k] == getattr(o, attr) for k, (_, o) in zip(picked, objects, strict=True)
        ) / len(objects)
    return result


@torch.inference_mode()
def evaluate_clip(
    model_dir: PathLike,
    world_root: PathLike,
    split: str = "val",
    *,
    feature_layer: int = -2,
    threads: int | None = None,
) -> dict[str, float]:
    """Held-out quality of a mini CLIP on the world's `split`:

    - `i2t_top1` / `t2i_top1`: each image against the split's distinct canonical concise captions
      (identical caption texts count as the same answer), and the other way round;
    - `*_detailed`: the same against every image's detailed caption (positions, sizes, relations);
    - `region_shape` / `region_colour` / `region_size`: zero-shot attribute accuracy of every object's
      `feature_layer` patch features (what the stitched model reads).
    """
    world = Path(world_root)
    rows = read_jsonl(world / split / "captions.jsonl")
    metas = pair_meta(world, split)
    scenes = [Scene.from_dict(metas[Path(r["image"]).stem]["scene"]) for r in rows]
    model = ChineseCLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    concise, detailed = [r["references"][0] for r in rows], [r["detailed"] for r in rows]
    captions = sorted(set(concise))
    with torch_threads(threads):
        vision = model.get_image_features(
            pixel_values=normalize_pixels(load_pixels(world, [r["image"] for r in rows])),
            output_hidden_states=True,
        )
        images = F.normalize(vision.pooler_output, dim=-1)  # (N, D)
        texts = F.normalize(text_embeds(model, tokenizer, captions + detailed), dim=-1)  # (C + N, D)
        result = _retrieval(images, texts[: len(captions)], concise, captions)
        result |= {
            f"{k}_detailed": v
            for k, v in _retrieval(images, texts[len(captions) :], detailed, detailed).items()
        }
        result |= _region_attributes(model, tokenizer, vision.hidden_states[feature_layer], scenes)
        result |= box_probe(model, vision.hidden_states[feature_layer], scenes, feature_layer)
    return {**result, "n_images": len(rows), "n_captions": len(captions)}


def _patch_features(model: ChineseCLIPModel, scenes: list[Scene], feature_layer: int) -> torch.Tensor:
    pixels = normalize_pixels(render_batch(scenes))
    out = model.get_image_features(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[feature_layer][:, 1:]  # (N, P, D_v)


def box_probe(
    model: ChineseCLIPModel,
    hidden: torch.Tensor,
    scenes: list[Scene],
    feature_layer: int = -2,
    n_fit: int = 2000,
    ridge: float = 1e-2,
) -> dict[str, float]:
    """Is an object's box linearly readable from the patch features the bridge reads?

    A ridge regression shared by all patches maps one patch's `feature_layer` vector (plus a bias)
    to the box of the object covering most of that patch (/ image size); it is fitted on `n_fit`
    fresh scenes (`seechat.mini.fresh`, never the evaluated ones). Each evaluated object's box is then
    read from the single patch it covers most; `box_probe_acc@0.5` is the share of objects whose
    read box has IoU >= 0.5 with the truth (what grounding Acc@0.5 asks of the stitched model)."""
    patch = model.config.vision_config.patch_size
    fit_scenes = fresh_scenes(random.Random("seechat-mini/box-probe"), n_fit, scenes[0].image_size)
    feats = torch.cat(
        [_patch_features(model, fit_scenes[i : i + 256], feature_layer) for i in range(0, n_fit, 256)]
    )  # (N, P, D)
    targets, keep = zip(*(patch_box_targets(s, patch) for s in fit_scenes), strict=True)
    x = F.pad(feats[torch.stack(keep)], (0, 1), value=1.0).double()  # (K, D + 1)
    y = torch.stack(targets)[torch.stack(keep)].double()  # (K, 4)
    w = torch.linalg.solve(
        x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y
    )  # (D + 1, 4)
    read, truth = [], []
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            p = int(patch_areas(o.bbox, scene.image_size, patch).argmax())
            read.append((F.pad(hidden[b, 1 + p], (0, 1), value=1.0).double() @ w).clamp(0, 1) * 1000)
            truth.append(torch.tensor(o.bbox, dtype=torch.double) / scene.image_size * 1000)
    ious = box_iou(torch.stack(read).numpy(), torch.stack(truth).numpy())  # (O,); a flipped box has IoU 0
    return {"box_probe_acc@0.5": float((ious >= 0.5).mean())}
