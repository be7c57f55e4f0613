"""Several `unipeft` command lines in one launch (what `torchrun -m unipeft.cli ...` runs, without paying the
start-up of torch + transformers once per command): argv lists come as JSON, each with its expected exit code and,
optionally, environment variables for that command only (e.g. UNIPEFT_STOP_AT_STEP).

    torchrun --nproc_per_node 2 tests/programs_ddp/cli_runs.py '[[0, "train", "--model", ...], [130, {"K": "V"}, ...]]'
"""

from __future__ import annotations

import json
import os
import sys

from unipeft.cli.main import main

if __name__ == "__main__":
    for code, *argv in json.loads(sys.argv[1]):
        env = argv.pop(0) if argv and isinstance(argv[0], dict) else {}
        os.environ.update(env)
        try:
            got = main(argv)
        finally:
            for k in env:
                os.environ.pop(k)
        if got != code:
            raise SystemExit(f"exit {got} (expected {code}) from unipeft {' '.join(argv)}")
