"""How each position type is resolved and installed: installer(model, ins, arch, handle) -> list[Site].
Installers register by position type (inject.py's for the spec's positions, token_rows.py its own), and
inject() dispatches on the type of each insertion's position; a new position plugs in here."""

from __future__ import annotations

from typing import Callable

INSTALLERS: dict[type, Callable] = {}


def position_installer(pos_type: type):
    """Register the decorated function as the installer of `pos_type` positions."""

    def deco(fn):
        INSTALLERS[pos_type] = fn
        return fn

    return deco


def installer_for(position) -> Callable:
    try:
        return INSTALLERS[type(position)]
    except KeyError:
        raise TypeError(f"no installer for position {type(position).__name__}; known: "
                        f"{[t.__name__ for t in INSTALLERS]}") from None
