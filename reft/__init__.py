"""reft: representation finetuning (RED, LoReFT, DiReFT, ...) for Hugging Face models."""

from . import _progress  # first: imports tqdm.auto without its notebook warning (see reft/_progress.py)
from .interventions import (
    RED,
    ConsReFT,
    DiReFT,
    Intervention,
    LoBiReFT,
    LoFiT,
    LoReFT,
    NoReFT,
    OrthDiReFT,
    ReFTr1,
    make_intervention,
    register_intervention,
    registered_interventions,
)
from .config import ReftConfig
from .model import IntervenableModel, get_reft_model
from .positions import PositionSpec
from .train import TrainConfig, Trainer
from . import data, detect, evaluate, objectives

__version__ = "0.1.0"

__all__ = [
    "Intervention",
    "RED",
    "LoReFT",
    "DiReFT",
    "NoReFT",
    "ConsReFT",
    "LoBiReFT",
    "OrthDiReFT",
    "LoFiT",
    "ReFTr1",
    "register_intervention",
    "make_intervention",
    "registered_interventions",
    "IntervenableModel",
    "ReftConfig",
    "get_reft_model",
    "PositionSpec",
    "TrainConfig",
    "Trainer",
    "data",
    "detect",
    "evaluate",
    "objectives",
]
