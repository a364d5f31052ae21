"""Which precision to compute in when the user says "auto": bf16 only where the hardware does
bf16 arithmetic natively. Without it (e.g. an AVX2-only CPU) PyTorch emulates bf16 and a
convolution becomes ~10x *slower* than fp32 (measured: bench/speed.py), so "auto" must never
pick bf16 just because autocast accepts it.

TRANSLATE_NATIVE_BF16=1 (or 0) makes "auto" resolve as it would on a CPU with (or without)
native bf16, whatever this CPU has: the test suite runs both kinds on any machine with it, and a
user can keep an AMX machine in fp32 without editing recipes."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from translate.errors import ConfigError

CPUINFO = Path("/proc/cpuinfo")
# AVX512_BF16 (Cooper Lake, Zen 4+) and AMX-BF16 (Sapphire Rapids+) do bf16 dot products in
# hardware; oneDNN uses them for convolutions and matmuls under autocast.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
AMX_FLAGS = ("amx_bf16", "amx_tile")  # Intel's matrix units (Sapphire Rapids+)
SWITCH = "TRANSLATE_NATIVE_BF16"


def forced_cpu_bf16() -> bool | None:
    """What TRANSLATE_NATIVE_BF16 forces (True/False), None when it is unset or empty."""
    value = os.environ.get(SWITCH, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ConfigError(f"{SWITCH}={value!r}: use 1 (act as a CPU with native bf16), 0 (act as "
                          "one without) or leave it unset (read the CPU's flags)")
    return value == "1"


def cpu_has_bf16(cpuinfo: Path | None = None) -> bool:
    """Does this CPU (or the kind TRANSLATE_NATIVE_BF16 names) compute bf16 natively? An
    explicit `cpuinfo` file is read as it is, switch or not."""
    if cpuinfo is None and (forced := forced_cpu_bf16()) is not None:
        return forced
    return any(f in cpu_flags(cpuinfo) for f in NATIVE_BF16_FLAGS)


def cpu_has_amx(cpuinfo: Path | None = None) -> bool:
    """Does this CPU have AMX (its flags; TRANSLATE_NATIVE_BF16 does not change this)?"""
    return any(f in cpu_flags(cpuinfo) for f in AMX_FLAGS)


def cpu_flags(cpuinfo: Path | None = None) -> set[str]:
    """The words of /proc/cpuinfo (or of `cpuinfo`), its flags among them; empty where there
    is none to read. /proc/cpuinfo is read once a process (~1.2 KB a core: hundreds of KB on
    a large server, and loading a generator asks up to three times); an explicit file is read
    each call."""
    return set(_words(cpuinfo) if cpuinfo is not None else _machine_words(CPUINFO))


@functools.cache
def _machine_words(path: Path) -> frozenset[str]:
    return _words(path)


def _words(path: Path) -> frozenset[str]:
    try:
        return frozenset(path.read_text().split())
    except OSError:
        return frozenset()


def native_bf16(device: torch.device, cpuinfo: Path | None = None) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16(cpuinfo)


def launcher_precision() -> str | None:
    """What `accelerate launch` asked for (--mixed_precision, its config file, or its default
    "no"), None outside accelerate launch (plain python, torchrun)."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION")
    return value.lower() if value else None


def training_precision(requested: str, launcher: str | None, device: torch.device,
                       cpuinfo: Path | None = None) -> tuple[str, str]:
    """(the autocast mode for a run: "no", "bf16" or "fp16"; why, in a few words for the start
    line). `launcher` is what `accelerate launch` asked for, None without it."""
    if requested == "auto":
        if launcher is not None:
            # The launcher's choice is explicit (or its documented default); a recipe's "auto"
            # only says "pick something fast" and must not overrule it.
            return launcher, f"auto: accelerate launch --mixed_precision {launcher}"
        if device.type == "cpu" and cpuinfo is None and forced_cpu_bf16() is not None:
            mode = "bf16" if forced_cpu_bf16() else "no"
            return mode, f"auto: {SWITCH}={os.environ[SWITCH].strip()}"
        if native_bf16(device, cpuinfo):
            return "bf16", f"auto: native bf16 on this {device.type.upper()}"
        return "no", f"auto: no native bf16 on this {device.type.upper()}"
    if launcher not in (None, "no", requested):
        # Accelerator(mixed_precision=...) overrides the launcher, which would silently run fp32.
        raise ConfigError(f"train.mixed_precision: the launcher asks for {launcher} (accelerate "
                          f"launch --mixed_precision or its config file) but the run is set to "
                          f"{requested!r}; pass --mixed-precision {launcher} (or auto) to "
                          "translate train or launch with --mixed_precision no")
    return requested, "set by the recipe or --mixed-precision"


def inference_precision(requested: str, device: torch.device, cpuinfo: Path | None = None) -> str:
    """"fp32" or "bf16" for `translate apply` / load_generator."""
    if requested == "auto":
        return "bf16" if native_bf16(device, cpuinfo) else "fp32"
    return requested
