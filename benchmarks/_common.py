"""What every benchmark writes the same way: machine facts, markdown tables, and a result's JSON
(+ markdown) written atomically, so an interrupted write never leaves half a file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

from segreward.engine.allocator import keep_freed_memory, malloc_setting

# Every benchmark runs as segreward's commands do: freed memory kept for reuse (glibc; see
# segreward.engine.allocator). SEGREWARD_MALLOC=default measures with malloc as it is.
keep_freed_memory()


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo``; elsewhere the
    platform's processor string): two machines of one "kind" may carry different CPUs."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or platform.machine())
    numbers = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields)
    return f"{name} ({numbers})" if numbers else name


def machine_info() -> dict:
    """Facts a timing or a score depends on: versions, processor and the vector instructions torch
    uses on it (``cpu_capability``: AVX2 and AVX-512 kernels sum in other orders, so a CPU run's
    numbers are reproducible only where it matches), threads, load."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "malloc": malloc_setting()}
    # set to reproduce another CPU's numbers (e.g. AVX2 kernels on an AVX-512 machine)
    isa = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)}
    if isa:
        info["isa_env"] = isa
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A markdown table as lines."""
    out = ["| " + " | ".join(str(h) for h in header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_result(out: str | Path, result: dict, markdown: str | None = None) -> Path:
    """``out`` with suffix ``.json`` (and ``.md`` when ``markdown`` is given), each atomically.
    Returns the JSON path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    _atomic_text(path, json.dumps(result, indent=1))
    if markdown is not None:
        _atomic_text(out.with_suffix(".md"), markdown)
    return path
