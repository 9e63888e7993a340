"""What the running x86 CPU offers oneDNN's int8 and bf16 kernels, read from torch's own probes.

oneDNN's u8 x s8 int8 kernels take one of four instruction paths, best first:

* ``amx``: AMX tiles (``amx_int8``), exact int32 accumulation;
* ``avx512_vnni``: AVX-512 VNNI (``vpdpbusd``), exact;
* ``avx_vnni``: the 256-bit AVX-VNNI of newer client/server CPUs, exact;
* ``avx2``: no VNNI at all. ``vpmaddubsw`` adds each *pair* of u8 x s8 products in int16 with
  saturation, so a pair sum above 32767 is clipped: with full-range uint8 activations
  ([0, 255]) and int8 weights ([-128, 127]) a pair can reach 2 * 255 * 128 = 65280 and the
  result is silently wrong. It is exact when ``2 * activation_max * weight_max <= 32767``:
  activations [0, 180] with weights [-91, 91] (the default there), 7-bit activations
  ([0, 127]) with 8-bit weights, or 7-bit weights ([-64, 63]) with 8-bit activations.

bf16 is "native" when oneDNN has bf16 kernels here (AVX512-BF16, AMX-BF16 or AVX-NE-CONVERT);
without them oneDNN cannot create an int8 primitive with bf16 output.

>>> from qcore_onednn_x86.cpu_features import detect_cpu, TARGET_CPUS
>>> detect_cpu().int8_kernel in TARGET_CPUS
True
>>> cpu_for_target("avx2").int8_pair_sums_saturate
True
"""

from __future__ import annotations

from typing import Optional

import attrs

__all__ = [
    "CpuFeatures",
    "TARGET_CPUS",
    "PAIR_SUM_LIMIT",
    "detect_cpu",
    "cpu_for_target",
    "check_target",
    "pair_sum_is_exact",
    "hardware_facts",
]

#: The int8 kernel paths, from the most to the least capable; a ``target`` names one of them.
TARGET_CPUS = ("amx", "avx512_vnni", "avx_vnni", "avx2")

#: The largest int16 value a u8 x s8 pair sum may reach on a CPU without VNNI.
PAIR_SUM_LIMIT = 32767

_TARGET_TEXT = {
    "amx": "AMX (exact int8)",
    "avx512_vnni": "AVX-512 VNNI (exact int8)",
    "avx_vnni": "AVX-VNNI (exact int8)",
    "avx2": "AVX2 without VNNI (u8 x s8 pair sums saturate in int16)",
}


@attrs.frozen
class CpuFeatures:
    """The int8/bf16 facts about one CPU that decide how oneDNN's kernels compute.

    ``name``: the CPU's name as torch reads it; ``capability``: torch's ATen dispatch level
    (``torch.backends.cpu.get_cpu_capability()``: "AVX2", "AVX512", ...); the booleans are the
    instruction-set flags torch probes (``torch.cpu.get_capabilities()``); ``native_bf16``:
    oneDNN has bf16 kernels on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``).
    """

    name: str
    capability: str
    avx2: bool
    avx512_vnni: bool
    avx_vnni: bool
    amx_int8: bool
    avx512_bf16: bool
    amx_bf16: bool
    native_bf16: bool

    @property
    def int8_kernel(self) -> str:
        """The path oneDNN's int8 kernels take here: one of :data:`TARGET_CPUS`."""
        if self.amx_int8:
            return "amx"
        if self.avx512_vnni:
            return "avx512_vnni"
        if self.avx_vnni:
            return "avx_vnni"
        return "avx2"

    @property
    def int8_pair_sums_saturate(self) -> bool:
        """True where u8 x s8 products are summed in pairs in int16 with saturation (no VNNI, no AMX)."""
        return self.int8_kernel == "avx2"

    def describe(self) -> str:
        """One line: the CPU, its int8 path and whether bf16 is native."""
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"{self.name} (torch capability {self.capability}): int8 via {_TARGET_TEXT[self.int8_kernel]}, {bf16}"

    def to_dict(self) -> dict:
        """The fields plus ``int8_kernel`` and ``int8_pair_sums_saturate``, for JSON and the report."""
        return attrs.asdict(self) | {
            "int8_kernel": self.int8_kernel,
            "int8_pair_sums_saturate": self.int8_pair_sums_saturate,
        }


def detect_cpu() -> CpuFeatures:
    """The running CPU, from torch's probes (not cached: cheap, and tests can patch the probes)."""
    import torch

    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}

    def flag(name: str) -> bool:
        return bool(capabilities.get(name, False))

    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return CpuFeatures(
        name=str(capabilities.get("cpu_name", "") or "unknown CPU"),
        capability=str(torch.backends.cpu.get_cpu_capability()),
        avx2=flag("avx2"),
        avx512_vnni=flag("avx512_vnni"),
        avx_vnni=flag("avx_vnni"),
        amx_int8=flag("amx_int8"),
        avx512_bf16=flag("avx512_bf16"),
        amx_bf16=flag("amx_bf16"),
        native_bf16=native_bf16,
    )


def check_target(target: Optional[str]) -> Optional[str]:
    """``target`` if it is None or one of :data:`TARGET_CPUS`, else a ValueError naming them."""
    if target is not None and target not in TARGET_CPUS:
        raise ValueError(
            f"unknown target CPU {target!r}: expected one of {', '.join(TARGET_CPUS)} "
            f"(or None for the CPU this runs on)"
        )
    return target


def cpu_for_target(target: Optional[str]) -> CpuFeatures:
    """The running CPU for ``target=None``, else a CPU whose int8 path is ``target``."""
    if check_target(target) is None:
        return detect_cpu()
    return CpuFeatures(
        name=f"target {target}",
        capability="AVX512" if target in ("amx", "avx512_vnni") else "AVX2",
        avx2=True,
        avx512_vnni=target in ("amx", "avx512_vnni"),
        avx_vnni=target == "avx_vnni",
        amx_int8=target == "amx",
        avx512_bf16=target == "amx",
        amx_bf16=target == "amx",
        native_bf16=target == "amx",
    )


def pair_sum_is_exact(activation_max: int, weight_abs_max: int) -> bool:
    """Whether two u8 x s8 products of these magnitudes always fit int16 (exact without VNNI).

    >>> pair_sum_is_exact(180, 91), pair_sum_is_exact(127, 128), pair_sum_is_exact(255, 128)
    (True, True, False)
    """
    return 2 * activation_max * weight_abs_max <= PAIR_SUM_LIMIT


def hardware_facts() -> dict:
    """The running CPU as the backend's ``hardware()`` record: the fields, ``describe`` and
    ``target`` (the ``default_config(target=...)`` name of this CPU's int8 path)."""
    cpu = detect_cpu()
    return cpu.to_dict() | {"describe": cpu.describe(), "target": cpu.int8_kernel}
