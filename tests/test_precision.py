"""train.mixed_precision: explicit values win, null defers to accelerate launch, auto picks by hardware."""

import pytest

from fastvae import precision


@pytest.fixture
def no_launcher(monkeypatch):
    monkeypatch.delenv(precision.LAUNCHER_ENV, raising=False)


def test_explicit_values_and_null_are_kept(no_launcher):
    assert precision.choose("bf16", "cpu") == ("bf16", "train.mixed_precision")
    assert precision.choose("no", "cuda") == ("no", "train.mixed_precision")
    assert precision.choose(None, "cpu")[0] is None


def test_auto_takes_the_launchers_value(monkeypatch):
    monkeypatch.setenv(precision.LAUNCHER_ENV, "fp16")
    assert precision.choose("auto", "cpu") == ("fp16", "auto: accelerate launch says fp16")


def test_auto_on_a_cpu_follows_its_bf16_instructions(no_launcher, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    value, why = precision.choose("auto", "cpu")
    assert value == "no" and why.startswith("auto: this CPU has no bf16 instructions")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert precision.choose("auto", "cpu") == ("bf16", "auto: this CPU has avx512_bf16")


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "no")])
def test_auto_on_cuda_follows_the_compute_capability(no_launcher, monkeypatch, capability, expected):
    monkeypatch.setattr(precision.torch.cuda, "get_device_capability", lambda: capability)
    value, why = precision.choose("auto", "cuda")
    assert value == expected and why == f"auto: CUDA compute capability {capability[0]}.{capability[1]}"


def test_this_machines_flags_are_read_from_cpuinfo():
    flags = open("/proc/cpuinfo").read()
    assert precision.cpu_bf16_flags() == [f for f in precision.CPU_BF16_FLAGS if f" {f}" in flags]
