"""reft: representation finetuning (RED, LoReFT, DiReFT, ...) for Hugging Face models."""

from .interventions import (
    RED,
    ConsReFT,
    DiReFT,
    Intervention,
    LoBiReFT,
    LoReFT,
    NoReFT,
    OrthDiReFT,
    ReFTr1,
    make_intervention,
    register_intervention,
    registered_interventions,
)
from .checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from .model import IntervenableModel
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
    "ReFTr1",
    "register_intervention",
    "make_intervention",
    "registered_interventions",
    "IntervenableModel",
    "PositionSpec",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "latest_checkpoint",
    "TrainConfig",
    "Trainer",
    "data",
    "detect",
    "evaluate",
    "objectives",
]
