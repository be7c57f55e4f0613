"""What the user sees and keeps: start/end summaries, metrics.jsonl, eval_results.json and loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path


def human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}T"


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


def box(title: str, rows: list[tuple[str, object]]) -> str:
    width = max([len(k) for k, _ in rows] + [8])
    lines = [f"── {title} " + "─" * max(0, 60 - len(title))]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows if v is not None]
    return "\n".join(lines)


def fmt_metrics(m: dict) -> str:
    def f(v):
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) and abs(v) < 1e6 else str(v)

    return "  ".join(f"{k}={f(v)}" for k, v in m.items())


class MetricsLog:
    """metrics.jsonl: one JSON line per logged train step and per evaluation."""

    def __init__(self, path: Path, keep_until_step: int | None = None, active: bool = True):
        self.path = Path(path)
        if not active:  # other processes of a multi-device run only read it
            return
        if keep_until_step is not None and self.path.is_file():
            # on resume, drop lines past the checkpoint: those steps are about to be replayed
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= keep_until_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif keep_until_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def plot_losses(records: list[dict], out: Path, title: str = "") -> bool:
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "eval_loss" not in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def write_json(path: Path, data: dict) -> None:
    from ..io.atomic import write_text

    write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")
