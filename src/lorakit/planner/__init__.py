"""Training memory planned exactly, on fake tensors: :func:`plan` and :func:`fit`."""

from .core import nf4_bytes, plan
from .fit import fit
from .report import MemoryPlan, parse_size
from .shapes import BUILTIN

__all__ = ["BUILTIN", "MemoryPlan", "fit", "nf4_bytes", "parse_size", "plan"]
