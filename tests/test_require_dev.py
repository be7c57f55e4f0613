"""Under `make test` (UNIPEFT_REQUIRE_DEV=1) a missing dev dependency or a self-skipping test fails the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SKIPPING = '''
import pytest

def test_skips_itself():
    pytest.skip("tokenizer not installed")

@pytest.mark.skipif(True, reason="needs CUDA")
def test_declared_condition():
    pass

def test_runs():
    pass
'''


def _run(tmp_path: Path, makefile_models: str | None = None) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    shutil.copy(HERE / "conftest.py", repo / "tests" / "conftest.py")
    shutil.copy(HERE.parent / "pyproject.toml", repo / "pyproject.toml")
    make = (HERE.parent / "Makefile").read_text()
    if makefile_models is not None:
        make = "\n".join(f"MODELS  := {makefile_models}" if ln.startswith("MODELS") else ln for ln in make.splitlines())
    (repo / "Makefile").write_text(make)
    (repo / "tests" / "test_skipping.py").write_text(SKIPPING)
    (repo / "tests" / "test_whole_file.py").write_text('import pytest\npytest.importorskip("no_such_module_q7")\n')
    env = {**os.environ, "UNIPEFT_REQUIRE_DEV": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests"]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_self_skips_fail_and_declared_skips_stay(tmp_path):
    r = _run(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out
    assert "skipped itself under UNIPEFT_REQUIRE_DEV=1" in out and "no_such_module_q7" in out


@pytest.mark.slow
def test_missing_dev_package_fails_at_start(tmp_path):
    r = _run(tmp_path, makefile_models="no-such-model-package-q7==0.1")
    out = r.stdout + r.stderr
    assert r.returncode == 4, out
    assert "missing: no-such-model-package-q7" in out, out
