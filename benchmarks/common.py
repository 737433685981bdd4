"""Shared helpers of the benchmark scripts: machine facts, metrics, result files."""
from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from igq_plugin._io import atomic_write
from igq_plugin.ops import sqnr_db  # noqa: F401  (re-exported for the scripts)


def machine_info() -> dict:
    """CPU model and the ISA flags that change quantized-kernel speed (machines differ)."""
    model, flags = platform.processor(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        model = m.group(1).strip() if m else model
        found = set(re.findall(r"\b(avx2|avx512f|avx512_vnni|avx512_bf16|amx_tile|amx_int8|avx_vnni)\b", text))
        flags = sorted(found)
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_markdown(path: Path, title: str, rows: list[dict], columns: list[str], meta: dict) -> None:
    lines = [f"# {title}", ""]
    machines = meta.get("machines") or {"": meta.get("machine", {})}  # {device: machine_info()} or one machine
    for device, m in machines.items():
        lines.append(f"Machine{f' ({device})' if device else ''}: {m.get('cpu')} "
                     f"({', '.join(m.get('flags', [])) or 'no AVX2/AVX-512 flags'}), "
                     f"{m.get('threads')} threads, torch {m.get('torch')}.")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    save_text(path, "\n".join(lines) + "\n")  # atomic, like save_json


def save_json(path: Path, results: dict, indent: int = 1) -> None:
    """Write ``results`` to ``path`` atomically (a run cut off mid-write keeps the previous file)."""
    save_text(path, json.dumps(results, indent=indent))


def save_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (igq_plugin's writer: temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig, path: Path, **kwargs) -> None:
    """``fig.savefig`` through the same atomic writer: a plot is never left half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), **kwargs))
