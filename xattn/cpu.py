"""What this CPU can do, read from the kernel (``/proc/cpuinfo`` flags), never assumed.

Figures depend on it (ONNX Runtime's INT8 kernels use VNNI where present; BF16 needs AVX512-BF16 or AMX), so
every benchmark records it beside its numbers. Machines here differ: AVX2 only on some, AVX-512 with VNNI and
BF16 on others.
"""

from __future__ import annotations

import platform

#: flag in /proc/cpuinfo -> the name reports use
FEATURES = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8", "avx512_fp16": "AVX512-FP16",
}


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """The features of :data:`FEATURES` this CPU reports, in that order (empty when nothing can be read,
    e.g. not Linux: unknown, not absent)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [name for flag, name in FEATURES.items() if flag in flags]


def has_vnni(features: list[str]) -> bool:
    """u8 x s8 dot products without the 16-bit intermediate that can saturate (VNNI or AMX)."""
    return any(f in features for f in ("AVX512-VNNI", "AVX-VNNI", "AMX-INT8"))


def has_bf16(features: list[str]) -> bool:
    return any(f in features for f in ("AVX512-BF16", "AMX-BF16"))


def describe_cpu() -> dict:
    """Model name and features, for reports."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu_model": model, "cpu_features": cpu_features()}
