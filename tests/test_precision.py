"""precision "auto": bf16 exactly where the hardware does bf16 natively, fp32 elsewhere; and the
fast optimizer path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from translate import config
from translate.core import loop, precision
from translate.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
AVX2_ONLY = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text * 2)  # one block per core
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert not precision.cpu_has_bf16(_cpuinfo(tmp_path, AVX2_ONLY))
    assert precision.cpu_has_bf16(_cpuinfo(tmp_path, SAPPHIRE))
    assert precision.cpu_has_bf16(_cpuinfo(tmp_path, "flags : avx512_bf16\n"))  # Zen 4
    assert not precision.cpu_has_bf16(tmp_path / "missing")  # not Linux: assume none


@pytest.mark.parametrize("flags,launcher,expected", [
    (AVX2_ONLY, "no", "no"),        # emulated bf16 is ~10x slower: stay in fp32
    (SAPPHIRE, "no", "bf16"),
    (AVX2_ONLY, "bf16", "bf16"),    # the launcher's explicit choice wins over auto
    (SAPPHIRE, "fp16", "fp16"),
])
def test_auto_training_precision(flags, launcher, expected, tmp_path):
    info = _cpuinfo(tmp_path, flags)
    assert precision.training_precision("auto", launcher, CPU, info) == expected


def test_explicit_training_precision_is_kept_or_refused(tmp_path):
    info = _cpuinfo(tmp_path, SAPPHIRE)
    assert precision.training_precision("no", "no", CPU, info) == "no"
    assert precision.training_precision("bf16", "bf16", CPU, info) == "bf16"
    with pytest.raises(ConfigError, match="the launcher asks for bf16"):
        precision.training_precision("no", "bf16", CPU, info)


def test_auto_inference_precision(tmp_path):
    assert precision.inference_precision("auto", CPU, _cpuinfo(tmp_path, AVX2_ONLY)) == "fp32"
    assert precision.inference_precision("auto", CPU, _cpuinfo(tmp_path, SAPPHIRE)) == "bf16"
    assert precision.inference_precision("fp32", CPU, _cpuinfo(tmp_path, SAPPHIRE)) == "fp32"


def _toy(tmp_path: Path, extra: list[str]) -> config.RunConfig:
    return config.load(ROOT / "recipes" / "toy_gan_ring.toml", [
        "model.hidden=16", "train.steps=2", "train.log_every=1", f'run_dir="{tmp_path / "run"}"',
        *extra])


@pytest.mark.parametrize("flags,expected", [(AVX2_ONLY, "no"), (SAPPHIRE, "bf16")])
def test_auto_precision_reaches_autocast_in_a_real_run(flags, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, flags))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    dtypes: set[torch.dtype] = set()
    real_setup = loop.setup

    def observed(cfg):
        s = real_setup(cfg)
        for net in s.nets.values():
            for m in net.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
        return s

    monkeypatch.setattr(loop, "setup", observed)
    cfg = _toy(tmp_path, [])
    assert cfg.train.mixed_precision == "auto"  # the default
    result = loop.train(cfg, progress=False)
    assert result.step == 2
    assert (torch.bfloat16 in dtypes) == (expected == "bf16"), dtypes


def test_adam_uses_the_fused_kernel_on_cpu(tmp_path):
    s = loop.setup(_toy(tmp_path, []))
    for opt in s.opts:
        group = opt.param_groups[0]
        assert group.get("fused") is True, group
