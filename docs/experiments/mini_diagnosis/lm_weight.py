"""Mini-LM pretraining with the answer tokens of the corpus's QA dialogues weighted W times.

    python docs/experiments/mini_diagnosis/lm_weight.py W STEPS OUT   # e.g. 10 280 /tmp/lm_w10

The demo's recipe (`LMRecipe`, same packing, random windows) on `runs/mini/world`, except that each
token's loss is weighted: 1 for text, W from the first assistant reply of a QA dialogue on. Prints
`evaluate_lm` on the val split as one JSON line.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from seechat.data.char_tokenizer import build_char_tokenizer
from seechat.mini.expert_training import read_jsonl, torch_threads, train_loop, world_texts
from seechat.mini.lm_expert import LMRecipe, evaluate_lm, lm_config, lm_documents

weight, steps, out = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
world = Path("runs/mini/world")
recipe = LMRecipe(steps=steps)
tok = build_char_tokenizer(world_texts(world))
ids: list[int] = []
weights: list[float] = []
for row in read_jsonl(world / "text" / "lm_corpus.jsonl"):
    tokens = tok(lm_documents([row], tok)[0], add_special_tokens=False)["input_ids"]
    first = len(tokens)
    if "messages" in row:
        prompt = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
        first = len(tok(prompt, add_special_tokens=False)["input_ids"])
    ids += tokens
    weights += [1.0] * first + [weight] * (len(tokens) - first)
stream, token_weight = torch.tensor(ids), torch.tensor(weights)
torch.manual_seed(recipe.seed)
model = AutoModelForCausalLM.from_config(lm_config(recipe, tok)).train()
windows = torch.Generator().manual_seed(recipe.seed)
span = recipe.seq_len + 1


def loss_at(step: int) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - span, (recipe.batch_size,), generator=windows).tolist()
    batch = torch.stack([stream[s : s + span] for s in starts])  # (B, L + 1)
    w = torch.stack([token_weight[s + 1 : s + span] for s in starts])  # weight of each target token
    logits = model(input_ids=batch[:, :-1]).logits
    nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    return (nll * w).sum() / w.sum()


out.mkdir(parents=True, exist_ok=True)
start = time.time()
with torch_threads(2):
    train_loop("lm", out, list(model.parameters()), recipe, loss_at)
model.generation_config.pad_token_id = tok.pad_token_id
model.eval().save_pretrained(out)
tok.save_pretrained(out / "tokenizer")
result = {k: round(v, 4) for k, v in evaluate_lm(out, world, "val", threads=2).items()}
print(json.dumps({"weight": weight, "steps": steps, "train_s": round(time.time() - start, 1), **result}))
