"""Precision by hardware: `dtype: auto` follows the device's native bfloat16 support; no shipped recipe forces one."""

import yaml
from smk_helpers import REPO

from workflow_scripts import hardware

AVX2_ONLY = "processor : 0\nmodel name : AMD EPYC 7B13\nflags : fpu sse sse2 avx avx2 fma\n"
AVX512_BF16 = "processor : 0\nmodel name : AMD EPYC 9B14\nflags : fpu avx2 avx512f avx512_bf16\n"
AMX = "flags : avx2 avx512f amx_bf16 amx_tile\n"


def test_flags_are_read_from_cpuinfo():
    assert "avx2" in hardware.cpu_flags(AVX2_ONLY)
    assert hardware.cpu_model(AVX512_BF16) == "AMD EPYC 9B14"
    assert not hardware.cpu_has_native_bf16(hardware.cpu_flags(AVX2_ONLY))
    assert hardware.cpu_has_native_bf16(hardware.cpu_flags(AVX512_BF16))
    assert hardware.cpu_has_native_bf16(hardware.cpu_flags(AMX))


def test_auto_is_float32_on_a_cpu_without_native_bf16():
    got = hardware.resolve_dtype("auto", device="cpu", flags=hardware.cpu_flags(AVX2_ONLY))
    assert got["dtype"] == "float32" and got["native_bf16"] is False and got["warning"] is None
    assert hardware.resolve_dtype(None, device="cpu", flags=set())["dtype"] == "float32"


def test_auto_is_bf16_where_the_cpu_computes_it():
    for info in (AVX512_BF16, AMX):
        got = hardware.resolve_dtype("auto", device="cpu", flags=hardware.cpu_flags(info))
        assert got["dtype"] == "bfloat16" and got["native_bf16"] is True


def test_auto_on_a_gpu_asks_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve_dtype("auto", device="cuda")["dtype"] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_dtype("auto", device="cuda")["dtype"] == "float32"


def test_explicit_bf16_on_a_cpu_without_it_is_honoured_with_a_warning():
    got = hardware.resolve_dtype("bfloat16", device="cpu", flags=hardware.cpu_flags(AVX2_ONLY))
    assert got["dtype"] == "bfloat16"
    assert "slower" in got["warning"] and "\n" not in got["warning"]
    native = hardware.resolve_dtype("bfloat16", device="cpu", flags=hardware.cpu_flags(AVX512_BF16))
    assert native["warning"] is None
    assert hardware.resolve_dtype("float32", device="cpu", flags=set())["warning"] is None


def test_no_shipped_recipe_forces_a_precision():
    for path in (REPO / "config.yaml", REPO / "tests/configs/tiny.yaml"):
        recipes = yaml.safe_load(path.read_text()).get("recipes", {})
        for name, recipe in recipes.items():
            assert recipe.get("dtype", "auto") == "auto", f"{path.name}: recipes.{name}.dtype"


def test_environment_override_of_the_probe(monkeypatch):
    monkeypatch.setenv("SAFEFT_CPU_BF16", "0")
    assert hardware.resolve_dtype("auto", device="cpu")["dtype"] == "float32"
    monkeypatch.setenv("SAFEFT_CPU_BF16", "1")
    assert hardware.resolve_dtype("auto", device="cpu")["dtype"] == "bfloat16"
