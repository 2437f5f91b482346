"""`seechat export --format llava-hf`: transformers' LLaVA loads the export and gives seechat's logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration, Qwen2Config

from seechat.cli import main
from seechat.config import TrainableConfig
from seechat.data.collate import collate
from seechat.data.conversation import text_messages
from seechat.infer.generate import generate
from seechat.infer.sampling import SamplingParams
from seechat.model import apply_trainable, build, load
from seechat.model.checkpoint import write_checkpoint
from seechat.model.export import ExportError, export_llava_hf, llava_inputs, llava_view
from tests.helpers import model_config

QUESTION = [{"role": "user", "content": "<image>\n图里有什么？"}]
QUESTION_PARTS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "图里有什么？"}]}]


def _perturb(model) -> None:
    """Move every weight off its init so a mapping mistake cannot hide behind symmetric values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _check_same_logits(ckpt, out, images):
    model, processor = load(ckpt)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    enc = processor.encode_prompt(QUESTION, images[:1])
    with torch.no_grad():
        ours = model(enc.input_ids[None], pixel_values=enc.pixel_values).logits
        theirs = llava(input_ids=enc.input_ids[None], pixel_values=enc.pixel_values).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    return model, processor, llava, enc


@pytest.mark.parametrize("vision", ["clip", "chinese_clip", "siglip"])
def test_llava_export_gives_the_same_logits(experts, images, tmp_path, vision):
    torch.manual_seed(0)
    model, processor = build(model_config(experts, vision, "qwen2", "mlp2x_gelu"))
    _perturb(model)
    model.provenance["vision"] = model.provenance["lm"] = "full"  # save the perturbed experts too
    write_checkpoint(model, processor, tmp_path / "ckpt")
    export_llava_hf(tmp_path / "ckpt", tmp_path / "llava")
    model, processor, llava, enc = _check_same_logits(tmp_path / "ckpt", tmp_path / "llava", images)
    # transformers' own processor and generate agree with seechat's
    hf = AutoProcessor.from_pretrained(tmp_path / "llava")
    text = processor.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    inputs = hf(images=images[:1], text=[text], return_tensors="pt")
    assert torch.equal(inputs["input_ids"][0], enc.input_ids)
    torch.testing.assert_close(inputs["pixel_values"], enc.pixel_values)
    ours = generate(model, enc.input_ids[None], None, enc.pixel_values, SamplingParams(max_new_tokens=8))[0]
    with torch.no_grad():
        theirs = llava.generate(**inputs, max_new_tokens=8, do_sample=False)[
            0, enc.input_ids.numel() :
        ].tolist()
    assert theirs[: len(ours)] == ours


def test_tied_embeddings_and_lora_are_exported(experts, images, tmp_path):
    lm_path, _ = experts["lm"]["qwen2"]
    cfg = Qwen2Config.from_pretrained(lm_path)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tied_lm")
    mc = model_config(experts, "clip", "qwen2", "mlp2x_gelu")
    mc = dataclasses.replace(mc, lm=dataclasses.replace(mc.lm, path=str(tmp_path / "tied_lm")))
    model, processor = build(mc)
    apply_trainable(model, TrainableConfig(bridge="full", lm="lora"))
    _perturb(model)  # also moves the LoRA B matrices off zero, so the adapter matters
    write_checkpoint(model, processor, tmp_path / "ckpt")
    assert load(tmp_path / "ckpt")[0].provenance["lm"] == "lora"
    export_llava_hf(tmp_path / "ckpt", tmp_path / "llava")
    _check_same_logits(tmp_path / "ckpt", tmp_path / "llava", images)


def test_other_bridges_are_refused_clearly(experts, tmp_path, capsys):
    model, processor = build(model_config(experts, bridge="qformer"))
    write_checkpoint(model, processor, tmp_path / "ckpt")
    with pytest.raises(ExportError, match="needs the mlp2x_gelu bridge.*'qformer'"):
        export_llava_hf(tmp_path / "ckpt", tmp_path / "out")
    assert main(["export", "--format", "llava-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "mlp2x_gelu" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_exported_chat_template_takes_string_and_list_of_parts_messages(experts, images, tmp_path):
    """transformers' multimodal form and the string form with a literal <image> render the same
    prompt through AutoProcessor, and LLaVA's greedy reply to it is seechat's."""
    torch.manual_seed(0)
    model, processor = build(model_config(experts, "clip", "qwen2", "mlp2x_gelu"))
    _perturb(model)
    model.provenance["vision"] = model.provenance["lm"] = "full"
    write_checkpoint(model, processor, tmp_path / "ckpt")
    export_llava_hf(tmp_path / "ckpt", tmp_path / "llava")
    model, processor = load(tmp_path / "ckpt")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    hf = AutoProcessor.from_pretrained(tmp_path / "llava")
    enc = processor.encode_prompt(QUESTION, images[:1])
    ours = generate(model, enc.input_ids[None], None, enc.pixel_values, SamplingParams(max_new_tokens=8))[0]
    assert len(ours) >= 4  # a reply long enough for the comparison to mean something

    history = [
        *QUESTION_PARTS,
        {"role": "assistant", "content": [{"type": "text", "text": "红色的圆形。"}]},
        {"role": "user", "content": [{"type": "text", "text": "是什么颜色？"}]},
    ]
    for parts, string in ((QUESTION_PARTS, QUESTION), (history, text_messages(history, "<image>"))):
        assert (
            hf.apply_chat_template(parts, add_generation_prompt=True)
            == hf.apply_chat_template(string, add_generation_prompt=True)
            == processor.tokenizer.apply_chat_template(string, tokenize=False, add_generation_prompt=True)
        )
        assert hf.tokenizer.apply_chat_template(parts, tokenize=False) == hf.apply_chat_template(string)
    # seechat's own processor takes the list form too, with the image passed or carried by its part
    carried = [
        {
            "role": "user",
            "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "图里有什么？"}],
        }
    ]
    for form, imgs in ((QUESTION_PARTS, images[:1]), (carried, [])):
        mine = processor.encode_prompt(form, imgs)
        assert torch.equal(mine.input_ids, enc.input_ids) and torch.equal(mine.pixel_values, enc.pixel_values)

    for messages in (QUESTION, QUESTION_PARTS):
        text = hf.apply_chat_template(messages, add_generation_prompt=True)
        inputs = hf(images=images[:1], text=[text], return_tensors="pt")
        assert torch.equal(inputs["input_ids"][0], enc.input_ids)
        with torch.no_grad():
            theirs = llava.generate(**inputs, max_new_tokens=8, do_sample=False)[
                0, enc.input_ids.numel() :
            ].tolist()
        assert theirs[: len(ours)] == ours
    # the one-call transformers path: the image inside the message, tokenized and preprocessed
    inputs = hf.apply_chat_template(
        carried, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"][0], enc.input_ids)
    torch.testing.assert_close(inputs["pixel_values"], enc.pixel_values)


def test_export_onto_its_own_source_is_refused_and_loses_nothing(experts, tmp_path, capsys):
    """`seechat export CK CK` used to delete CK (the output was removed before the rename)."""
    ckpt = tmp_path / "ckpt"
    model, processor = build(model_config(experts, "clip", "qwen2", "mlp2x_gelu"))
    write_checkpoint(model, processor, ckpt)
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    for out in (ckpt, ckpt / "llava", tmp_path):
        assert main(["export", "--format", "llava-hf", str(ckpt), str(out)]) == 2
        assert "would replace the source" in capsys.readouterr().err
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before
    load(ckpt)
    with pytest.raises(ExportError, match="is the source itself"):
        export_llava_hf(ckpt, ckpt)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_llava_view_shares_the_modules_and_gives_the_same_logits(experts, images, vision):
    """`llava_view`: transformers' LLaVA made of the model's own modules (no copy), same logits;
    a bridge LLaVA has no layer for is refused as the export refuses it."""
    torch.manual_seed(0)
    model, processor = build(model_config(experts, vision, "qwen2", "mlp2x_gelu"))
    _perturb(model)
    llava = llava_view(model, processor.stop_token_ids, processor.tokenizer.pad_token_id).eval()
    assert llava.model.multi_modal_projector is model.bridge
    assert llava.lm_head.weight is model.language_model.get_output_embeddings().weight
    enc = processor.encode_prompt(QUESTION, images[:1])
    with torch.no_grad():
        ours = model(enc.input_ids[None], pixel_values=enc.pixel_values).logits
        theirs = llava(input_ids=enc.input_ids[None], pixel_values=enc.pixel_values).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    qformer, processor = build(model_config(experts, vision, "qwen2", "qformer"))
    with pytest.raises(ExportError, match="mlp2x_gelu"):
        llava_view(qformer, processor.stop_token_ids, processor.tokenizer.pad_token_id)


def test_llava_inputs_feed_a_training_batch_to_the_view_with_the_same_loss(experts, images):
    """`llava_inputs`: a padded seechat batch, with images or text-only, through the LLaVA view as
    a plain loop calls it gives seechat's own loss on that batch."""
    torch.manual_seed(0)
    model, processor = build(model_config(experts, "clip", "qwen2", "mlp2x_gelu"))
    _perturb(model)
    llava = llava_view(model, processor.stop_token_ids, processor.tokenizer.pad_token_id).eval()
    reply = {"role": "assistant", "content": "一个红色的圆。"}
    seen = [processor.encode_conversation([*QUESTION, reply], images[:1]) for _ in range(2)]
    seen[1] = processor.encode_conversation([*QUESTION, {**reply, "content": "圆"}], images[1:2])
    text = [processor.encode_conversation([{"role": "user", "content": "你好"}, reply])]
    for samples in (seen, text):
        batch = collate(samples, processor.tokenizer.pad_token_id)
        with torch.no_grad():
            theirs = llava(**llava_inputs(llava, batch)).loss
            ours = model(**batch).loss
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
