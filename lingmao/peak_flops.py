"""Peak FLOP/s of accelerators: the denominator of MFU, for the `mfu` a run logs and for every benchmark.

Dense (not 2:4-sparse) tensor-core peaks by precision, in TFLOP/s, from the vendors' data sheets (NVIDIA's
A100, A10, L4, L40, L40S, H100 and H200 data sheets and the V100 / T4 ones; where a sheet gives only the sparse
figure, half of it). `fp32` is plain float32 (`torch.set_float32_matmul_precision("highest")`), `tf32` float32
matrix multiplies on TF32 tensor cores (torch's "high" / "medium"). A CPU, MPS or a GPU not listed has no entry:
then MFU is not computed (set `logger.peak_tflops`, or `--peak-tflops` of the benchmarks).
"""

from __future__ import annotations

import re

# (the words a device name must hold, peaks); the first entry whose words are all in the name wins, so the
# variants of a chip come before the chip.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("h200", "nvl"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("h200",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (("h100", "nvl"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("h100", "pcie"), {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (("h100",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    (("a100",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM and PCIe alike
    (("l40s",), {"bf16": 366.5, "fp16": 366.5, "tf32": 183.0, "fp32": 91.6}),
    (("l40",), {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (("l4",), {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (("a10g",), {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (("a10",), {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (("v100", "pcie"), {"fp16": 112.0, "fp32": 14.0}),
    (("v100",), {"fp16": 125.0, "fp32": 15.7}),  # SXM2
    (("t4",), {"fp16": 65.0, "fp32": 8.1}),
)


def precision_key(precision: str, matmul_precision: str = "highest") -> str | None:
    """The table's column for a Lightning precision ("bf16-mixed", "16-mixed", "32-true", ...) and torch's
    float32 matmul precision; None for precisions it has no column for (64-bit)."""
    key = str(precision).split("-")[0]
    if key in ("bf16", "16"):
        return {"bf16": "bf16", "16": "fp16"}[key]
    if key == "32":
        return "fp32" if matmul_precision == "highest" else "tf32"
    return None


def peak_tflops(device_name: str, precision: str, matmul_precision: str = "highest") -> float | None:
    """The dense peak TFLOP/s of the device called `device_name` (as `torch.cuda.get_device_name` says) at
    `precision`; None when the table does not know the device or the precision."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    key = precision_key(precision, matmul_precision)
    for needed, peaks in PEAK_TFLOPS:
        if set(needed) <= words:
            return peaks.get(key) if key else None
    return None
