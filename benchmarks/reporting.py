"""Writing benchmark results: JSON (with the command and environment), a Markdown table and PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import jax

RESULTS_DIR = Path(__file__).parent / "results"
IMAGES_DIR = Path(__file__).parent.parent / "docs" / "images"


def image_path(name: str) -> Path:
    """Where a benchmark's plot goes: docs/images/<name>.png."""
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    return IMAGES_DIR / f"{name}.png"


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": command_line(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # code generator and optimisation level, when set
    }


def command_line() -> str:
    """How the running benchmark was started, as ``python -m benchmarks.<name> ...``: no machine's paths."""
    script = Path(sys.argv[0])
    module = f"-m benchmarks.{script.stem}" if script.parent.name == "benchmarks" else script.name
    return " ".join(["python", module] + sys.argv[1:])


def write_json(name: str, config: dict, rows: list[dict]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), "config": config, "rows": rows}, indent=2))
    return path


def publish(name: str, config: dict, rows: list[dict], columns, plot=None, write: bool = True) -> None:
    """Writes the JSON (unless ``write=False``: results saved before), the plot (``plot(rows, path)``) if
    any, and prints the Markdown table."""
    written = [str(write_json(name, config, rows))] if write else []
    if plot is not None:
        png = image_path(name)
        plot(rows, png)
        written.append(str(png))
    print()
    print(markdown_table(rows, columns))
    print(f"\nwrote {' and '.join(written)}")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); missing values print as an en dash."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("–" if value is None else format(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
