"""WHERE Δh goes and in which FORM: the only code that touches a model. Every change is reversible."""

from .base import ModuleSite, Site, Switch
from .module_copy import TrainableCopy
from .residual import SublayerDeltaSite
from .weight import LinearDeltaSite

__all__ = ["Site", "ModuleSite", "Switch", "LinearDeltaSite", "SublayerDeltaSite", "TrainableCopy"]
