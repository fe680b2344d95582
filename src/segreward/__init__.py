"""segreward: tune semantic-segmentation models on the metric they are judged by.

The core (metrics, rewards, samplers, REINFORCE) imports only torch.
"""

from segreward.errors import SegrewardError
from segreward.metrics import SegMetric, class_stats, confusion_matrix
from segreward.reinforce import ReinforceLoss, RewardWeightedCELoss, compute_advantages
from segreward.rewards import get_reward, miou
from segreward.sampling import get_sampler

__version__ = "0.1.0"

__all__ = [
    "SegrewardError",
    "SegMetric",
    "class_stats",
    "confusion_matrix",
    "ReinforceLoss",
    "RewardWeightedCELoss",
    "compute_advantages",
    "get_reward",
    "miou",
    "get_sampler",
]
