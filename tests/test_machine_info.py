"""This machine's capabilities, probed once: CPU features from /proc/cpuinfo, float32 and bfloat16
matmul rates and weight-streaming bandwidth, cached per CPU, shown by `omnifuse info --machine`
and in benchmark headers."""

from __future__ import annotations

import json

import pytest

from omnifuse.cli import main
from omnifuse.planner import resources
from omnifuse.runtime import cpu_features, cpu_model

AVX2_ONLY = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""
AVX512_BF16 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu avx fma avx2 avx512f avx512bw avx512_bf16 avx512_vnni avx512vbmi
"""
SAPPHIRE_RAPIDS = "model name\t: Intel Xeon Platinum 8481C\nflags\t: avx2 fma avx512f avx512_bf16 avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize(("text", "features", "model"), [
    (AVX2_ONLY, ("avx2", "fma"), "AMD EPYC 7B12"),
    (AVX512_BF16, ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"), "AMD EPYC 9B14"),
    (SAPPHIRE_RAPIDS, ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"),
     "Intel Xeon Platinum 8481C"),
    (ARM, (), None),
])
def test_cpu_features_and_model_come_from_cpuinfo(text, features, model):
    assert cpu_features(text) == features
    if model is not None:
        assert cpu_model(text) == model
    else:
        assert cpu_model(text)  # no model name line: the platform's name, never empty


def test_the_measurement_is_cached_and_taken_again_on_another_cpu(tmp_path, monkeypatch):
    calls = []
    real = resources._measure_cpu

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(resources, "_measure_cpu", counted)
    first = resources.local_cpu_measurement()
    assert first["fp32_gflops"] > 0 and first["bf16_gflops"] > 0 and first["bf16_vs_fp32"] > 0 and first["bandwidth_gb_s"] > 0
    assert first["features"] == list(cpu_features()) and first["cpu"] == cpu_model()
    assert resources.local_cpu_measurement()["date"] == first["date"] and len(calls) == 1  # read from the cache
    path = tmp_path / "cache" / "omnifuse" / "local_cpu.json"
    data = json.loads(path.read_text())
    data["bf16_gflops"] = 999.0  # a user's edit is respected
    path.write_text(json.dumps(data))
    assert resources.local_cpu().tflops["bf16"] == pytest.approx(0.999) and len(calls) == 1
    data["cpu"] = "some other CPU"  # a home folder shared with another machine
    path.write_text(json.dumps(data))
    again = resources.local_cpu_measurement()
    assert len(calls) == 2 and again["cpu"] == cpu_model() and again["bf16_gflops"] != 999.0


def test_info_machine_prints_features_and_rates(capsys):
    assert main(["info", "--machine", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"cpu", "features", "threads", "fp32_gflops", "bf16_gflops", "bandwidth_gb_s", "memory_gb",
                         "path"}
    assert main(["info", "--machine"]) == 0
    table = capsys.readouterr().out
    assert "bfloat16 matmul" in table and f"{data['bf16_vs_fp32']:.2f}x float32" in table and "weight streaming" in table
    line = resources.machine_line()
    assert line.startswith(f"machine: {data['cpu']}") and "bfloat16" in line and "GB/s" in line
    assert all(f in line for f in data["features"])


def test_a_measurement_of_an_earlier_kind_is_taken_again_and_a_broken_one_is_named(tmp_path):
    path = tmp_path / "cache" / "omnifuse" / "local_cpu.json"
    path.parent.mkdir(parents=True)
    old = {"name": "local CPU", "fp32_gflops": 1.0, "memory_gb": 1.0, "bandwidth_gb_s": 1.0, "date": "2026-01-01",
           "bandwidth_method": "an earlier way, without bfloat16"}
    path.write_text(json.dumps(old))
    assert resources.local_cpu_measurement()["bf16_gflops"] > 0  # measured again, not refused
    data = json.loads(path.read_text())
    del data["bf16_gflops"]  # the current kind, edited by hand into something incomplete
    path.write_text(json.dumps(data))
    from omnifuse.config import ConfigError

    with pytest.raises(ConfigError, match=r"local_cpu.json must hold .*bf16_gflops.*delete it to measure again"):
        resources.local_cpu_measurement()
