"""MMSegmentation plug-in: reward tuning as one loss ``type`` in any mmseg config.

Import it through the config, never by editing mmseg's sources::

    custom_imports = dict(imports=["segreward.mmseg"], allow_failed_imports=False)
    model = dict(decode_head=dict(loss_decode=dict(type="ReinforceLoss", num_classes=19)))

Importing registers in mmseg's registries:

* ``MODELS``: ``ReinforceLoss`` (REINFORCE with a task reward, :mod:`segreward.reinforce`) and
  ``RewardWeightedCELoss`` (the earlier reward-weighted cross-entropy, a named baseline);
* ``DATASETS``: ``CamVidDataset`` (SegNet's 11-class CamVid, void -> ignore) and
  ``SyntheticShiftDataset`` (segreward's synthetic domain-shift data).

``python -m segreward.mmseg.calibrate CONFIG CHECKPOINT`` fits reward-optimal class offsets on a
split of the config and folds them into a checkpoint mmseg loads as it is (docs/mmseg.md).

It needs the ``mmseg`` extra: ``pip install 'segreward[mmseg]'``.
"""

from segreward.mmseg._require import MMSegNotInstalledError, require_mmseg

require_mmseg()

from segreward.mmseg.datasets import REGISTERED_DATASETS, CamVidDataset  # noqa: E402
from segreward.mmseg.losses import ReinforceLoss, RewardWeightedCELoss  # noqa: E402

__all__ = ["CamVidDataset", "MMSegNotInstalledError", "REGISTERED_DATASETS", "ReinforceLoss",
           "RewardWeightedCELoss", "require_mmseg"]
