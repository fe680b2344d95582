"""The trainer: configs, stages, evaluation, checkpoints, DDP."""

from segreward.engine.config import Config, config_from_dict, load_config
from segreward.engine.trainer import evaluate, train

__all__ = ["Config", "config_from_dict", "load_config", "train", "evaluate"]
