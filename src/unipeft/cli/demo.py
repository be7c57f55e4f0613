"""`unipeft demo` (`make demo`): a real LoRA fine-tune of the embedded SmolLM2-135M-Instruct, offline, on CPU.

The task is made here: turn a sentence like "Alice is 31 and lives in Paris." into the JSON record
{"name": "Alice", "age": 31, "city": "Paris"}. The base model answers in its own words (exact match near 0);
after a few minutes of LoRA it answers with the exact record. The held-out names and cities are unseen in training (half the training rows use made-up ones), so the model
must learn to copy from the sentence, not to recall a list.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from . import options as O
from .errors import CliError

INSTRUCTION = "Extract the person's name, age and city from the sentence as a JSON object."
TRAIN_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
               "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara",
               "Zoe", "Liam", "Maya", "Noah", "Olga", "Pablo", "Amara", "Bruno", "Chloe", "Dmitri", "Elif", "Felix",
               "Gita", "Hugo", "Ivan", "Jana", "Kenji", "Leila", "Mohan", "Nina", "Otto", "Petra", "Rahul", "Sofia"]
EVAL_NAMES = ["Hannah", "Igor", "Julia", "Kofi", "Lucia", "Mateo", "Nora", "Omar", "Paula", "Ravi", "Sara", "Tomas"]
TRAIN_CITIES = ["Paris", "Tokyo", "Berlin", "Lagos", "Lima", "Oslo", "Madrid", "Cairo", "Toronto", "Mumbai", "Seoul",
                "Nairobi", "Dublin", "Vienna", "Quito", "Hanoi", "Prague", "Denver", "Athens", "Lisbon", "Chicago",
                "Dakar", "Kyiv", "Perth", "Havana", "Tunis", "Bergen", "Porto", "Austin", "Delhi", "Lyon", "Riga",
                "Sydney", "Taipei", "Warsaw", "Munich", "Santiago", "Montreal", "Istanbul", "Jakarta"]
EVAL_CITIES = ["Rome", "Boston", "Zurich", "Manila", "Accra", "Helsinki", "Bogota", "Osaka"]
# Made-up names and places (half the training rows) teach copying from the sentence, not recalling a list.
SYLLABLES = ["ka", "lo", "mi", "ra", "to", "ven", "sa", "dor", "li", "ne", "bo", "tur", "ga", "shi", "mel", "an"]
TEMPLATES = ["{name} is {age} and lives in {city}.", "{name}, aged {age}, lives in {city}.",
             "At {age}, {name} calls {city} home.", "{name} ({age}) is from {city}.",
             "Meet {name}: {age} years old, living in {city}.", "{city} is where {name}, {age}, lives.",
             "My friend {name} is {age} years old and lives in {city}.", "{name} moved to {city} and is now {age}."]


def _invented(rng) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_rows(n: int, names, cities, seed: int, invent: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 89)
        if invent and rng.random() < 0.5:
            name = _invented(rng)
        if invent and rng.random() < 0.5:
            city = _invented(rng)
        sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        rows.append({"instruction": INSTRUCTION, "input": sentence,
                     "output": json.dumps({"name": name, "age": age, "city": city})})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def demo_command(ns) -> int:
    from .commands import load_base_and_adapter
    from .evaluate import generation_eval
    from .modeling import load_tokenizer, resolve_model
    from .task_table import task_class
    from .train import train_command

    t0 = time.time()
    out = Path(ns.output)
    steps, samples = ns.steps or 40, ns.samples or 24
    print("unipeft demo: LoRA-tune SmolLM2-135M-Instruct to turn sentences into JSON records (offline, CPU)\n"
          "preparing the embedded model (the first run converts the GGUF file once)...", flush=True)
    model_path = resolve_model(ns.model)
    data = out.parent / f"{out.name}-data"
    write_jsonl(data / "train.jsonl", make_rows(480, TRAIN_NAMES, TRAIN_CITIES, seed=1, invent=True))
    eval_rows = make_rows(samples, EVAL_NAMES, EVAL_CITIES, seed=2)
    write_jsonl(data / "eval.jsonl", eval_rows)

    # before: the base model on the held-out sentences
    tok = load_tokenizer(model_path, "causal-lm")
    task = task_class("causal-lm").from_data(tok, 128, eval_rows, "eval.jsonl", {})
    feats, _ = task.encode(eval_rows, "eval.jsonl")
    base, tok, _, task = load_base_and_adapter({"model": ns.model, "task": "causal-lm"}, None, task.meta, task)
    before, before_pairs = generation_eval(base, task, tok, feats, samples, 40, 8)
    print(f"base model, before tuning: exact match {before['exact_match']:.0%} on {len(before_pairs)} held-out "
          f"sentences ({time.time() - t0:.0f} s)\n", flush=True)
    del base

    given = {"model": ns.model, "train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "output": str(out),
             "overwrite": True, "task": "causal-lm", "method": "lora", "max_steps": steps, "batch_size": 8,
             "lr": 1e-3, "max_length": 128, "warmup": 0.1, "eval_every": 0, "save_every": 1000,
             "log_every": 5, "gen_samples": samples, "max_new_tokens": 40, "precision": "fp32"}
    opts = O.resolve(given, None, {"r": 16, "lora_alpha": 32}, None)
    train_command(opts)
    after = json.loads((out / "eval_results.json").read_text())
    if "exact_match" not in after:
        raise CliError("the demo run wrote no generation metrics", "see the output above")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    after_pairs = _pairs(after)
    print("\n── before → after ──────────────────────────────────────────────")
    print(f"  exact match   {before['exact_match']:.0%}  →  {after['exact_match']:.0%}   "
          f"(held-out sentences with unseen names and cities)")
    if "rougeL" in before:
        print(f"  ROUGE-L       {before['rougeL']:.3f} →  {after['rougeL']:.3f}")
    print(f"  train loss    {rows[0]['loss']:.3f} →  {after.get('train_loss', float('nan')):.3f}")
    for (p0, ref), (p1, _), row in list(zip(before_pairs, after_pairs, eval_rows))[:3]:
        print(f"\n  sentence: {row['input']}\n  before:   {_clip(p0)}\n  after:    {_clip(p1)}"
              f"{'   ✓' if p1.strip() == ref.strip() else '   ✗'}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; the adapter is in {out / 'adapter'}. Try:\n"
          f"  unipeft generate --adapter {out} --prompt $'{INSTRUCTION.replace(chr(39), chr(92) + chr(39))}\\n\\n"
          f"Olga is 52 and lives in Kyoto.'")
    return 0


def _pairs(results: dict) -> list[tuple[str, str]]:
    return [(s["prediction"], s["reference"]) for s in results.get("samples", [])]


def _clip(s: str, n: int = 90) -> str:
    s = s.replace("\n", " ⏎ ")
    return s if len(s) <= n else s[: n - 1] + "…"
