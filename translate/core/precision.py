"""Which precision to compute in when the user says "auto": bf16 only where the hardware does
bf16 arithmetic natively. Without it (e.g. an AVX2-only CPU) PyTorch emulates bf16 and a
convolution becomes ~10x *slower* than fp32 (measured: bench/speed.py), so "auto" must never
pick bf16 just because autocast accepts it."""

from __future__ import annotations

from pathlib import Path

import torch

from translate.errors import ConfigError

CPUINFO = Path("/proc/cpuinfo")
# AVX512_BF16 (Cooper Lake, Zen 4+) and AMX-BF16 (Sapphire Rapids+) do bf16 dot products in
# hardware; oneDNN uses them for convolutions and matmuls under autocast.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: Path | None = None) -> bool:
    try:
        flags = set((cpuinfo or CPUINFO).read_text().split())
    except OSError:
        return False
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def native_bf16(device: torch.device, cpuinfo: Path | None = None) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16(cpuinfo)


def training_precision(requested: str, launcher: str, device: torch.device,
                       cpuinfo: Path | None = None) -> str:
    """The autocast mode for a run: "no", "bf16" or "fp16". `launcher` is what `accelerate
    launch --mixed_precision` (or its config file) asked for, "no" when nothing was asked."""
    if requested == "auto":
        if launcher != "no":
            return launcher
        return "bf16" if native_bf16(device, cpuinfo) else "no"
    if launcher not in ("no", requested):
        # Accelerator(mixed_precision=...) overrides the launcher, which would silently run fp32.
        raise ConfigError(f"train.mixed_precision: the launcher asks for {launcher} (accelerate "
                          f"launch --mixed_precision or its config file) but the run is set to "
                          f"{requested!r}; pass --mixed-precision {launcher} (or auto) to "
                          "translate train or launch with --mixed_precision no")
    return requested


def inference_precision(requested: str, device: torch.device, cpuinfo: Path | None = None) -> str:
    """"fp32" or "bf16" for `translate apply` / load_generator."""
    if requested == "auto":
        return "bf16" if native_bf16(device, cpuinfo) else "fp32"
    return requested
