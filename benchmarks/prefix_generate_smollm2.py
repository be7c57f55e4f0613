"""Prefix tuning's greedy generation on SmolLM2-135M: ours vs HF PEFT 0.21.2 vs each row generated alone.

The same prefix in both (HF PEFT's PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True,
encoder_hidden_size=512) as in the bench, weights scaled x3 so the prefix changes the tokens, saved and loaded into
ours), three E2E-style prompts left-padded as cli/evaluate.generate_texts pads them, 8 greedy tokens. Reference: each
row alone, full forward per step, no cache, through HF PEFT's forward. Also transformers' own generate on the base
with HF PEFT's prefix prefilled as the cache. Design note 23; the tiny-model tests are tests/test_prefix_generate_hf.py.
Run: PYTHONPATH=src nice -n 10 python benchmarks/prefix_generate_smollm2.py  (~10 min on a busy 2-core CPU).
Output of the run recorded in benchmarks/results/prefix_generate_smollm2.txt."""
import tempfile
import time

import torch

import peft as hf, unipeft as up
from unipeft.cli import embedded
from unipeft.positions.attention_kv import prefix_mask_path
t0 = time.time()
torch.manual_seed(0)
base, tok = embedded.load_embedded(); base.eval()
P, S = 10, 8
hm = hf.get_peft_model(base, hf.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=512)).eval()
with torch.no_grad():
    for p in hm.prompt_encoder.parameters(): p.mul_(3.0)
d = tempfile.mkdtemp(); hm.save_pretrained(d)
base2, _ = embedded.load_embedded()
um = up.PeftModel.from_pretrained(base2, d).eval()
prompts = ["name[The Eagle], eatType[coffee shop], food[French]", "name[Alimentum], area[city centre]", "name[Zizzi], eatType[pub], food[Italian], priceRange[cheap], near[Burger King]"]
rows = [torch.tensor(tok(p)["input_ids"]) for p in prompts]
n = max(len(r) for r in rows); B = len(rows); pad = tok.pad_token_id if tok.pad_token_id is not None else 0
ids = torch.full((B, n), pad); mask = torch.zeros_like(ids)
for i, r in enumerate(rows): ids[i, n-len(r):] = r; mask[i, n-len(r):] = 1
for m in (hm, um): m.generation_config.eos_token_id = None; m.generation_config.pad_token_id = pad
kw = dict(max_new_tokens=S, do_sample=False, output_scores=True, return_dict_in_generate=True)
with torch.no_grad():
    res = {}
    for path in ("fast", "explicit"):
        with prefix_mask_path(path):
            res[path] = um.generate(input_ids=ids, attention_mask=mask, **kw)
    oh = hm.generate(input_ids=ids, attention_mask=mask, **kw)
    b = hm.get_base_model()
    full = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
    oc = b.generate(input_ids=ids, attention_mask=full, cache=hm.get_prompt(B), **kw)
    with hm.disable_adapter():
        ob = b.generate(input_ids=ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        seq = r[None]; first = None
        for k in range(S):
            l = hm(input_ids=seq, use_cache=False).logits[:, -1]
            if k == 0: first = l[0]
            seq = torch.cat([seq, l.argmax(-1, keepdim=True)], 1)
        alone = seq[0, len(r):]
        print(i, "alone", alone.tolist(), "| ours fast", torch.equal(res["fast"].sequences[i, n:], alone), "explicit", torch.equal(res["explicit"].sequences[i, n:], alone),
              "first-step |ours-alone| %.2e" % (res["fast"].scores[0][i] - first).abs().max(),
              "| hf", torch.equal(oh.sequences[i, n:], alone), "hf first |hf-alone| %.2e" % (oh.scores[0][i] - first).abs().max(),
              "|hf-noprefix| %.2e" % (oh.scores[0][i] - ob.scores[0][i]).abs().max(), "| cache-route", torch.equal(oc.sequences[i, n:], alone))
    print("ours vs cache route max score diff %.2e" % (torch.stack(res["fast"].scores) - torch.stack(oc.scores)).abs().max(),
          "fast vs explicit %.2e" % (torch.stack(res["fast"].scores) - torch.stack(res["explicit"].scores)).abs().max())
    print("hf decoded:", tok.batch_decode(oh.sequences[:, n:])); print("ours decoded:", tok.batch_decode(res["fast"].sequences[:, n:]))
print("secs", time.time() - t0)
