"""What every experiment records beside its numbers (the device that ran it and the commit),
and how results files keep the runs of other devices."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The accelerator kind and count, or on a CPU its model and cores: timings mean nothing
    without it, and a CPU's `device_kind` is just "cpu"."""
    devices = jax.devices()
    if jax.default_backend() == "cpu":
        return f"{_cpu_model()}, {os.cpu_count()} cores"
    return f"{len(devices)}x {devices[0].device_kind}"


def commit() -> str:
    """The checkout's commit (12 hex digits); outside a git checkout (a copy of the tree, as on
    a lent GPU machine) $PNEUMOJAX_COMMIT, else "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=False).stdout.strip()
    except OSError:  # no git
        out = ""
    return out or os.environ.get("PNEUMOJAX_COMMIT") or "unknown"


def portable(place: str | os.PathLike) -> str:
    """A folder as results files record it: `PATH/` and its last two names (`folder:` kept), so
    a committed record says which data or run it used without naming the machine's layout."""
    kind, sep, where = str(place).rpartition(":") if ":" in str(place) else ("", "", str(place))
    parts = pathlib.PurePath(where).parts
    if not where or not (len(parts) > 2 or pathlib.PurePath(where).is_absolute()
                         or ".." in parts):
        return str(place)
    return f"{kind}{sep}PATH/" + "/".join(parts[-2:]) if len(parts) > 1 else str(place)


def merge_results(path: pathlib.Path, records: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Writes `path`: its records, with the new ones replacing any that agree on `key`, so
    runs on other devices or at other sizes stay beside them. Returns what was written."""
    ident = lambda r: json.dumps([r.get(k) for k in key], sort_keys=True)
    new = {ident(r) for r in records}
    old = json.loads(path.read_text()) if path.exists() else []
    merged = [r for r in old if ident(r) not in new] + records
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged
