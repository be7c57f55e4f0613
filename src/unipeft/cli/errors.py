"""Errors the CLI reports as one clear message (problem + fix) and a non-zero exit, never a traceback."""

from __future__ import annotations


class CliError(Exception):
    """A problem with the user's input or environment. `fix` says what to do about it."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None, exit_code: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"error: {self.problem}" + (f"\n  fix: {self.fix}" if self.fix else "")


class TrainingStopped(CliError):
    """Training ended early on purpose (Ctrl-C) or by necessity (non-finite loss); a checkpoint was kept."""

    exit_code = 1


def column_error(what: str, name: str, found, source: str, flag: str) -> CliError:
    return CliError(f"{what} column {name!r} not found in {source}; columns found: {sorted(found)}",
                    f"pass {flag} with one of {sorted(found)}")
