"""segreward: tune semantic-segmentation models on the metric they are judged by."""

__version__ = "0.1.0"
