"""Run logs: write them (mmengine's ``vis_data/scalars.json`` format, TensorBoard) and read
them back -- ours and MMSegmentation's -- into tidy tables and CSV files."""

from segreward.runlog.export import clean_logs, write_csvs
from segreward.runlog.reader import RunLog, RunLogWarning, find_sources, load_run, load_runs, parse_scalars
from segreward.runlog.writer import RunWriter

__all__ = [
    "RunLog",
    "RunLogWarning",
    "RunWriter",
    "clean_logs",
    "find_sources",
    "load_run",
    "load_runs",
    "parse_scalars",
    "write_csvs",
]
