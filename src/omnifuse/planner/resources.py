"""The planner's editable tables: accelerators (with this machine's CPU, measured once) and prices."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omnifuse.config import ConfigError

__all__ = ["Accelerator", "Prices", "load_hardware", "load_prices", "local_cpu", "local_cpu_measurement", "machine_line"]

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_HARDWARE = DATA / "hardware.yaml"
DEFAULT_PRICES = DATA / "prices.yaml"


@dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    tflops: dict[str, float]  # peak by compute dtype
    memory_gb: float
    bandwidth_gb_s: float
    source: str

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s for matmuls in ``dtype``; weight-only int4 runs its matmuls in bf16."""
        compute = "bf16" if dtype == "int4" else dtype
        if compute not in self.tflops:
            raise ConfigError(f"{self.key} lists no {compute} throughput; it has {', '.join(self.tflops)}")
        return self.tflops[compute] * 1e12


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping")
    return data


def _mapping(entry: Any, where: str, fields: tuple[str, ...]) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping with {', '.join(fields)}, got {entry!r}")
    return entry


def _check(where: str, entry: dict, required: tuple[str, ...], numbers: dict[str, Any], zero_ok: bool = False) -> None:
    """One line naming everything wrong with a table entry (missing fields, numbers that are not), as
    a file edited by hand is where typos live and one round trip per mistake is tedious."""
    missing = [f for f in required if f not in entry]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    kind = "a non-negative" if zero_ok else "a positive"
    for field, value in numbers.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (value == 0 and not zero_ok):
            problems.append(f"{field} must be {kind} number, got {value!r}")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}")


def _section(data: dict, key: str, path: Path, what: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} file {path}: {key} must be a mapping of names to entries, got {value!r}")
    return value


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omnifuse"


def _this_cpu() -> dict[str, Any]:
    """What identifies this machine's CPU for the cache: a measurement taken on another CPU (a
    home folder shared between machines, a moved container) is measured again."""
    import torch

    from omnifuse.runtime import cpu_features, cpu_model

    return {"cpu": cpu_model(), "features": list(cpu_features()), "threads": torch.get_num_threads()}


def local_cpu_measurement(remeasure: bool = False) -> dict[str, Any]:
    """This machine's CPU, measured once with torch and cached in
    ``$XDG_CACHE_HOME/omnifuse/local_cpu.json`` (edit or delete it): its model and features
    (``runtime.CPU_FEATURES``), float32 and bfloat16 matmul GFLOP/s, the bandwidth at which a
    decode step's small-batch matmuls stream their weights, and its memory. A file from an earlier
    way of measuring, or from another CPU or thread count, is measured again."""
    path = _cache_dir() / "local_cpu.json"
    data = _read_measurement(path) if path.is_file() and not remeasure else None
    here = _this_cpu()
    if data is None or any(data.get(k) != v for k, v in here.items()):
        data = {**_measure_cpu(), **here}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
    return {**data, "path": str(path)}


def machine_line() -> str:
    """One line for a benchmark's header: this CPU, its features and measured rates, torch."""
    import torch

    d = local_cpu_measurement()
    return (f"machine: {d['cpu']}, {d['threads']} threads, features {' '.join(d['features']) or 'none'}; "
            f"float32 {d['fp32_gflops']:,.0f} GFLOP/s, bfloat16 {d['bf16_gflops']:,.0f} GFLOP/s "
            f"({d['bf16_vs_fp32']:.2f}x float32 on the same torch.mm), "
            f"weight streaming {d['bandwidth_gb_s']:.1f} GB/s; torch {torch.__version__}")


def local_cpu(remeasure: bool = False) -> Accelerator:
    """This machine's CPU as an accelerator (``local_cpu_measurement``): float32 and bfloat16
    matmul rates and the weight-streaming bandwidth."""
    data = local_cpu_measurement(remeasure)
    tflops = {"fp32": data["fp32_gflops"] / 1e3, "bf16": data["bf16_gflops"] / 1e3}
    return Accelerator("cpu", data["name"], tflops, data["memory_gb"], data["bandwidth_gb_s"],
                       f"measured {data['date']} ({data['path']})")


def _read_measurement(path: Path) -> dict[str, Any] | None:
    """The cached ``local_cpu.json``, or None for one measured an earlier way (measured again); a
    file edited into something else is one ConfigError naming it."""
    keys = ("name", "fp32_gflops", "bf16_gflops", "bf16_vs_fp32", "memory_gb", "bandwidth_gb_s", "date")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the CPU measurement {path}: {e}; delete it to measure again") from None
    if isinstance(data, dict) and data.get("bandwidth_method") != BANDWIDTH_METHOD:
        return None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ConfigError(f"the CPU measurement {path} must hold {', '.join(keys)}; delete it to measure again")
    return data


BANDWIDTH_METHOD = ("packed float32 linears, 256 MiB of weights: 8 rows for bandwidth, 512 rows for FLOP/s; "
                    "bfloat16 and float32: torch.mm of 256 x 1024 by 1024 x 1024")


def _measure_cpu() -> dict[str, Any]:
    import platform

    import torch

    # Both figures come from the linears omnifuse runs on a CPU (oneDNN-packed float32,
    # nn/packed.py), which run GEMMs about twice as fast as a plain torch.mm: a FLOP rate taken from
    # torch.mm put the prefill "lower bound" above what prefill measures. A decode step reads every
    # weight once for a few rows: what bounds it is the rate those linears stream weights at for a
    # small batch (a third to half of a plain copy's bandwidth on the CPUs seen here). A prefill
    # runs them on hundreds of rows: compute bound.
    from omnifuse.nn.packed import pack_linears

    layers = torch.nn.Sequential(*(torch.nn.Linear(2048, 4096, bias=False) for _ in range(8)))  # 256 MiB
    pack_linears(layers)

    def best_time(run, repeats: int) -> float:
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
        return best

    def through_layers(rows: torch.Tensor):
        return lambda: [layer(rows) for layer in layers]

    bandwidth = 8 * 2048 * 4096 * 4 / best_time(through_layers(torch.randn(8, 2048)), 4) / 1e9
    gflops = 2 * 512 * 2048 * 4096 * 8 / best_time(through_layers(torch.randn(512, 2048)), 3) / 1e9

    # bfloat16 is ~100x slower than float32 without native support (AVX2 only): a small product,
    # so the probe stays well under a second there, against what float32 does on the same shape
    def mm_gflops(dtype: torch.dtype) -> float:
        a, b = torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        return 2 * 256 * 1024 * 1024 / best_time(lambda: torch.mm(a, b), 3) / 1e9

    bf16_gflops, mm_fp32_gflops = mm_gflops(torch.bfloat16), mm_gflops(torch.float32)
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        memory_gb = 0.0
    return {"name": f"local CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "fp32_gflops": round(gflops, 1), "bf16_gflops": round(bf16_gflops, 1),
            "bf16_vs_fp32": round(bf16_gflops / mm_fp32_gflops, 2), "bandwidth_gb_s": round(bandwidth, 1),
            "memory_gb": round(memory_gb, 1), "date": time.strftime("%Y-%m-%d"), "bandwidth_method": BANDWIDTH_METHOD}


def load_hardware(path: str | Path | None = None) -> dict[str, Accelerator]:
    """The accelerator table (``cpu`` is measured on first use, not read from the file)."""
    path = Path(path) if path else DEFAULT_HARDWARE
    data = _read_yaml(path, "hardware")
    table = _section(data, "accelerators", path, "hardware")
    if not table:  # entries written at the top level would otherwise surface as "unknown accelerator"
        found = [k for k in data if k != "date"]
        hint = f" (found {', '.join(map(repr, found))} at the top level)" if found else ""
        raise ConfigError(f"hardware file {path} lists no accelerators{hint}; put each entry under "
                          "accelerators:, e.g. accelerators: {h100: {tflops: {bf16: 989.4}, memory_gb: 80, "
                          "bandwidth_gb_s: 3350}}")
    return {key: _accelerator(key, entry, path) for key, entry in table.items()}


_ACCELERATOR_FIELDS = ("tflops", "memory_gb", "bandwidth_gb_s")


def _accelerator(key: str, entry: Any, path: Path) -> Accelerator:
    where = f"hardware file {path}: accelerator {key!r}"
    entry = _mapping(entry, where, _ACCELERATOR_FIELDS)
    tflops = entry.get("tflops", {})
    if not isinstance(tflops, dict) or ("tflops" in entry and not tflops):
        raise ConfigError(f"{where}: tflops must map compute dtypes to peak TFLOP/s, e.g. {{bf16: 989.4}}, "
                          f"got {tflops!r}")
    numbers = {f"tflops.{dtype}": value for dtype, value in tflops.items()}
    numbers.update({f: entry[f] for f in _ACCELERATOR_FIELDS[1:] if f in entry})
    _check(where, entry, _ACCELERATOR_FIELDS, numbers)
    return Accelerator(key, str(entry.get("name", key)), {str(k): float(v) for k, v in tflops.items()},
                       float(entry["memory_gb"]), float(entry["bandwidth_gb_s"]), str(entry.get("source", path)))


@dataclass(frozen=True)
class Prices:
    date: str
    path: str
    api: dict[str, dict[str, Any]]
    gpu_hour: dict[str, dict[str, Any]]

    def api_price(self, model: str) -> dict[str, Any] | None:
        return self.api.get(model)

    def gpu_price(self, gpu: str) -> float:
        entry = self.gpu_hour.get(gpu)
        if entry is None or "usd" not in entry:
            raise ConfigError(f"no $/GPU-hour for {gpu!r} in the price file {self.path} (dated {self.date}); "
                              f"add gpu_hour: {{{gpu}: {{usd: ...}}}}")
        return float(entry["usd"])


def load_prices(path: str | Path | None = None) -> Prices:
    path = Path(path) if path else DEFAULT_PRICES
    data = _read_yaml(path, "price")
    if "date" not in data:
        raise ConfigError(f"price file {path} has no date; prices need the day they were checked")
    api = _section(data, "api", path, "price")
    for model, entry in api.items():  # USD per 1M tokens; zero is a price (a free tier)
        where = f"price file {path}: api.{model}"
        entry = _mapping(entry, where, ("input", "output"))
        _check(where, entry, ("input", "output"),
               {f: entry[f] for f in ("input", "output", "audio_input") if f in entry}, zero_ok=True)
    gpu_hour = _section(data, "gpu_hour", path, "price")
    for gpu, entry in gpu_hour.items():
        where = f"price file {path}: gpu_hour.{gpu}"
        entry = _mapping(entry, where, ("usd",))
        _check(where, entry, ("usd",), {"usd": entry["usd"]} if "usd" in entry else {}, zero_ok=True)
    return Prices(str(data["date"]), str(path), api, gpu_hour)
