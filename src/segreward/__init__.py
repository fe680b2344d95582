"""segreward: tune semantic-segmentation models on the metric they are judged by.

The core (metrics, rewards, samplers, REINFORCE) imports only torch.
"""

import importlib

from segreward.errors import SegrewardError

# The public names, imported on first use (PEP 562): `import segreward.cli` stays light, so the
# command answers Ctrl-C with one line even while torch is still loading.
_LAZY = {"SegMetric": "metrics", "class_stats": "metrics", "confusion_matrix": "metrics",
         "ReinforceLoss": "reinforce", "RewardWeightedCELoss": "reinforce", "compute_advantages": "reinforce",
         "get_reward": "rewards", "miou": "rewards", "get_sampler": "sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"segreward.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segreward' has no attribute {name!r}")


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
