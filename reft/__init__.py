"""reft: representation finetuning (RED, LoReFT, DiReFT, ...) for Hugging Face models."""

from . import _progress  # first: imports tqdm.auto without its notebook warning (see reft/_progress.py)
from .interventions import (
    RED,
    ConsReFT,
    DiReFT,
    Intervention,
    LoBiReFT,
    LoReFT,
    NoReFT,
    OrthDiReFT,
    make_intervention,
    register_intervention,
    registered_interventions,
)
from .checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from .config import ReftConfig
from .model import IntervenableModel, get_reft_model
from .positions import PositionSpec
from .train import TrainConfig, Trainer
from . import data, evaluate

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
    "register_intervention",
    "make_intervention",
    "registered_interventions",
    "IntervenableModel",
    "ReftConfig",
    "get_reft_model",
    "PositionSpec",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "latest_checkpoint",
    "TrainConfig",
    "Trainer",
    "data",
    "evaluate",
]
