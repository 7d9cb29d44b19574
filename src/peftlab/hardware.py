"""What this machine computes fast: whether bf16 matmuls are native here."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_amx_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "amx_bf16" in cpuinfo.read_text()


def bf16_helps() -> bool:
    """True on a CUDA device with bf16 or a CPU with AMX tiles (where bf16 matmuls are ~3x fp32)."""
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_amx_bf16()
