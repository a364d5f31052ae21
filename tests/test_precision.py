"""precision "auto": bf16 exactly where the hardware does bf16 natively, fp32 elsewhere; and the
fast optimizer path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from translate import config, precision, runner
from translate import recipe as recipe_mod
from translate.core import loop
from translate.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
AVX2_ONLY = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    """A new cpuinfo file (the machine's is read once a process, so each stand-in is new)."""
    path = tmp_path / f"cpuinfo-{len(list(tmp_path.glob('cpuinfo-*')))}"
    path.write_text(text * 2)  # one block per core
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert not precision.cpu_has_bf16(_cpuinfo(tmp_path, AVX2_ONLY))
    assert precision.cpu_has_bf16(_cpuinfo(tmp_path, SAPPHIRE))
    assert precision.cpu_has_bf16(_cpuinfo(tmp_path, "flags : avx512_bf16\n"))  # Zen 4
    assert not precision.cpu_has_bf16(tmp_path / "missing")  # not Linux: assume none


def test_the_machines_cpuinfo_is_read_once(tmp_path, monkeypatch):
    machine = _cpuinfo(tmp_path, AVX2_ONLY)
    monkeypatch.setattr(precision, "CPUINFO", machine)
    monkeypatch.delenv(precision.SWITCH, raising=False)
    assert not precision.cpu_has_bf16()
    machine.write_text(SAPPHIRE)
    assert not precision.cpu_has_bf16() and not precision.cpu_has_amx()  # not read again
    assert precision.cpu_has_bf16(machine)  # an explicit file is read each call


def test_amx_is_read_from_the_cpu_flags(tmp_path):
    assert precision.cpu_has_amx(_cpuinfo(tmp_path, SAPPHIRE))
    assert not precision.cpu_has_amx(_cpuinfo(tmp_path, AVX2_ONLY))
    assert not precision.cpu_has_amx(_cpuinfo(tmp_path, "flags : avx512f avx512_bf16\n"))
    assert not precision.cpu_has_amx(tmp_path / "missing")


def test_the_switch_makes_auto_resolve_as_the_other_kind_of_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, AVX2_ONLY))
    monkeypatch.delenv(precision.SWITCH, raising=False)
    assert not precision.cpu_has_bf16()
    monkeypatch.setenv(precision.SWITCH, "1")
    assert precision.cpu_has_bf16()
    assert precision.inference_precision("auto", CPU) == "bf16"
    assert precision.training_precision("auto", None, CPU) == ("bf16", "auto: TRANSLATE_NATIVE_BF16=1")
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, SAPPHIRE))
    monkeypatch.setenv(precision.SWITCH, "0")
    assert not precision.cpu_has_bf16()
    assert precision.inference_precision("auto", CPU) == "fp32"
    assert precision.training_precision("auto", None, CPU) == ("no", "auto: TRANSLATE_NATIVE_BF16=0")
    # An explicit file is read as it is (the flag tests above), and an explicit choice is kept.
    assert precision.cpu_has_bf16(_cpuinfo(tmp_path, SAPPHIRE))
    assert precision.training_precision("bf16", None, CPU)[0] == "bf16"
    monkeypatch.setenv(precision.SWITCH, "yes")
    with pytest.raises(ConfigError, match="TRANSLATE_NATIVE_BF16='yes': use 1 .* 0"):
        precision.cpu_has_bf16()


@pytest.mark.parametrize("flags,launcher,expected", [
    (AVX2_ONLY, None, ("no", "auto: no native bf16 on this CPU")),  # emulated bf16 is slow
    (SAPPHIRE, None, ("bf16", "auto: native bf16 on this CPU")),
    # accelerate launch's choice (explicit, or its default "no") wins over a recipe's auto.
    (AVX2_ONLY, "bf16", ("bf16", "auto: accelerate launch --mixed_precision bf16")),
    (SAPPHIRE, "no", ("no", "auto: accelerate launch --mixed_precision no")),
    (SAPPHIRE, "fp16", ("fp16", "auto: accelerate launch --mixed_precision fp16")),
])
def test_auto_training_precision(flags, launcher, expected, tmp_path, monkeypatch):
    monkeypatch.delenv(precision.SWITCH, raising=False)
    info = _cpuinfo(tmp_path, flags)
    assert precision.training_precision("auto", launcher, CPU, info) == expected


def test_the_launcher_is_read_from_accelerate_launch_only(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert precision.launcher_precision() is None  # plain python, torchrun
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")
    assert precision.launcher_precision() == "bf16"


def test_explicit_training_precision_is_kept_or_refused(tmp_path):
    info = _cpuinfo(tmp_path, SAPPHIRE)
    assert precision.training_precision("no", None, CPU, info)[0] == "no"
    assert precision.training_precision("no", "no", CPU, info)[0] == "no"
    assert precision.training_precision("bf16", "bf16", CPU, info)[0] == "bf16"
    assert precision.training_precision("bf16", "no", CPU, info)[0] == "bf16"
    with pytest.raises(ConfigError, match="the launcher asks for bf16"):
        precision.training_precision("no", "bf16", CPU, info)


def test_auto_inference_precision(tmp_path, monkeypatch):
    monkeypatch.delenv(precision.SWITCH, raising=False)
    assert precision.inference_precision("auto", CPU, _cpuinfo(tmp_path, AVX2_ONLY)) == "fp32"
    assert precision.inference_precision("auto", CPU, _cpuinfo(tmp_path, SAPPHIRE)) == "bf16"
    assert precision.inference_precision("fp32", CPU, _cpuinfo(tmp_path, SAPPHIRE)) == "fp32"


def _toy(tmp_path: Path, extra: list[str]) -> config.RunConfig:
    return recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml", [
        "model.hidden=16", "train.steps=2", "train.log_every=1", f'run_dir="{tmp_path / "run"}"',
        *extra])


def test_auto_precision_reaches_autocast_in_a_real_run(cpu_kind, tmp_path, monkeypatch):
    expected = cpu_kind
    dtypes: set[torch.dtype] = set()
    real_setup = loop.setup

    def observed(*args, **kw):
        s = real_setup(*args, **kw)
        for net in s.nets.values():
            for m in net.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
        return s

    monkeypatch.setattr(loop, "setup", observed)
    cfg = _toy(tmp_path, [])
    assert cfg.train.mixed_precision == "auto"  # the default
    result = runner.train(cfg, progress=False)
    assert result.step == 2
    assert (torch.bfloat16 in dtypes) == (expected == "bf16"), dtypes


def test_adam_uses_the_fused_kernel_on_cpu(tmp_path):
    s = runner.setup(_toy(tmp_path, []))
    for opt in s.opts:
        group = opt.param_groups[0]
        assert group.get("fused") is True, group


@pytest.mark.slow
def test_the_start_line_says_which_precision_and_why(cpu_kind, tmp_path):
    from conftest import run_cli

    switch = "1" if cpu_kind == "bf16" else "0"
    proc = run_cli("train", "recipes/toy_gan_ring.toml", "--set", "model.hidden=16", "--steps",
                   "1", "--run-dir", str(tmp_path / "auto"), "--no-progress")
    assert f"precision {cpu_kind} (auto: TRANSLATE_NATIVE_BF16={switch})" in proc.stderr
    proc = run_cli("train", "recipes/toy_gan_ring.toml", "--set", "model.hidden=16", "--steps",
                   "1", "--run-dir", str(tmp_path / "set"), "--no-progress",
                   "--mixed-precision", "no")
    assert "precision no (set by the recipe or --mixed-precision)" in proc.stderr
