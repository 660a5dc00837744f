"""Interventions: `[..., d] -> [..., d]` edits of hidden states, registered by name."""

from .base import Intervention, make_intervention, register_intervention, registered_interventions
from .consreft import ConsReFT
from .direft import DiReFT
from .lobireft import LoBiReFT
from .lofit import LoFiT, top_heads
from .loreft import LoReFT
from .noreft import NoReFT
from .orth_direft import OrthDiReFT
from .red import RED
from .reft_r1 import ReFTr1

__all__ = [
    "Intervention",
    "make_intervention",
    "register_intervention",
    "registered_interventions",
    "RED",
    "LoReFT",
    "DiReFT",
    "NoReFT",
    "ConsReFT",
    "LoBiReFT",
    "OrthDiReFT",
    "LoFiT",
    "top_heads",
    "ReFTr1",
]
