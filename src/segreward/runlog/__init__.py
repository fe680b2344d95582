"""Run logs: write them (mmengine's ``vis_data/scalars.json`` format, TensorBoard) and read
them back -- ours and MMSegmentation's -- into tidy tables and CSV files."""

from segreward.runlog.writer import RunWriter

__all__ = ["RunWriter"]
