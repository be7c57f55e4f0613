"""Read rows from JSONL/JSON, CSV/TSV, Parquet files or a `datasets` hub name; every failure says what to fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import CliError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
FORMATS_HINT = "use a .jsonl, .json, .csv, .tsv or .parquet file (or a `datasets` hub name when online)"


def read_rows(spec: str, flag: str, limit: int | None = None) -> list[dict]:
    """All rows of a data file (or hub dataset) as dicts; `flag` names the option in messages."""
    path = Path(spec)
    if path.is_file():
        rows = _read_file(path, flag)
    elif path.suffix.lower() in SUFFIXES or path.is_absolute() or spec.startswith("."):
        raise CliError(f"{flag}: file not found: {spec}", f"check the path (cwd: {Path.cwd()}); {FORMATS_HINT}")
    else:
        rows = _read_hub(spec, flag)
    if limit is not None:
        rows = rows[: max(0, limit)]
    if not rows:
        raise CliError(f"{flag}: {spec} holds no rows", "give a file with at least one example")
    return rows


def _read_file(path: Path, flag: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, flag)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _read_jsonl(path, flag)  # JSON Lines saved as .json
        if isinstance(data, dict):
            data = data.get("data", data.get("rows", [data]))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise CliError(f"{flag}: {path} must hold a list of objects (or JSON Lines)", "one object per example")
        return data
    if suffix in (".csv", ".tsv", ".parquet"):
        return _read_table(path, suffix, flag)
    raise CliError(f"{flag}: unsupported file type {suffix or '(none)'!r}: {path}", FORMATS_HINT)


def _read_jsonl(path: Path, flag: str) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"{flag}: {path} line {i} is not valid JSON ({e.msg})",
                               "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise CliError(f"{flag}: {path} line {i} is a {type(row).__name__}, not a JSON object",
                               'write one object per line, e.g. {"text": "...", "label": 1}')
            rows.append(row)
    return rows


def _read_table(path: Path, suffix: str, flag: str) -> list[dict]:
    try:
        import pandas as pd
    except ImportError:
        raise CliError(f"{flag}: reading {suffix} files needs pandas", "pip install 'unipeft[cli]'") from None
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, na_values=[""])
    except ImportError as e:
        raise CliError(f"{flag}: cannot read {path}: {e}", "pip install pyarrow") from None
    except Exception as e:  # pandas raises many parser error types
        if type(e).__name__ == "EmptyDataError":
            return []
        raise CliError(f"{flag}: cannot parse {path}: {e}", f"check that it is a valid {suffix[1:].upper()} file") from None
    return [{k: _native(v) for k, v in r.items()} for r in df.to_dict("records")]


def _native(v):
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _read_hub(spec: str, flag: str) -> list[dict]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise CliError(f"{flag}: {spec} is not a file, and the `datasets` package (for hub names) is not installed",
                       f"check the path, or pip install datasets; {FORMATS_HINT}") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise CliError(f"{flag}: {spec} is not a file and could not be loaded from the hub: {e}",
                       f"check the path or the dataset name; {FORMATS_HINT}") from None
    return [dict(r) for r in ds]


def columns_of(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows[:1000]:
        seen.update(dict.fromkeys(r))
    return list(seen)


def as_list(value, what: str, where: str) -> list:
    """A list cell: a real list, a JSON list in a string (CSV), or whitespace-separated words."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                out = json.loads(s)
            except json.JSONDecodeError:
                raise CliError(f"{where}: {what} {s[:60]!r} is not a valid JSON list",
                               'write e.g. ["EU", "rejects"] or space-separated words') from None
            if isinstance(out, list):
                return out
        return s.split()
    raise CliError(f"{where}: {what} must be a list, got {type(value).__name__} {value!r}",
                   'write a list, e.g. ["EU", "rejects", "German"]')
