"""Several `unipeft` command lines in one launch (what `torchrun -m unipeft.cli ...` runs, without paying the
start-up of torch + transformers once per command): argv lists come as JSON, each with its expected exit code.

    torchrun --nproc_per_node 2 tests/programs_ddp/cli_runs.py '[[0, "train", "--model", ...], ...]'
"""

from __future__ import annotations

import json
import sys

from unipeft.cli.main import main

if __name__ == "__main__":
    for code, *argv in json.loads(sys.argv[1]):
        got = main(argv)
        if got != code:
            raise SystemExit(f"exit {got} (expected {code}) from unipeft {' '.join(argv)}")
