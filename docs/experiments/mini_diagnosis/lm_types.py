"""Text-only QA of a mini LM per question type: the val split's VQA questions asked about each
image's detailed description (`evaluate_lm`'s format), exact answer share.

    python docs/experiments/mini_diagnosis/lm_types.py runs/mini/experts/lm
"""

import collections
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seechat.mini.expert_training import read_jsonl
from seechat.mini.lm_expert import _nll, lm_documents

model_dir, world = Path(sys.argv[1]), Path("runs/mini/world")
tok = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
detailed = {r["image"]: r["detailed"] for r in read_jsonl(world / "val" / "captions.jsonl")}
by_type = collections.defaultdict(list)
for r in read_jsonl(world / "val" / "vqa.jsonl"):
    by_type[r["type"]].append(
        {
            "messages": [
                {"role": "user", "content": f"图片描述：{detailed[r['image']]}\n{r['question']}"},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
    )


def encode(docs: list[str]) -> list[list[int]]:
    return tok(docs, add_special_tokens=False)["input_ids"]


with torch.inference_mode():
    for kind, rows in sorted(by_type.items()):
        ids = [x[:-1] for x in encode(lm_documents(rows, tok))]  # drop the template's final "\n"
        prompts = [
            tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
            for r in rows
        ]
        _, _, exact = _nll(model, ids, [len(p) for p in encode(prompts)])
        print(kind, len(rows), round(exact / len(rows), 3))
