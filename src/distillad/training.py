"""The trainer settings ``fit`` and ``benchmark`` accept (no Lightning import, so the CLI starts fast)."""

from functools import cache

#: Training precisions handed to Lightning (inference and export always run in float32).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")
#: ``ddp``: distributed data parallel over ``devices`` (GPUs, or CPU processes with gloo).
STRATEGIES = ("auto", "ddp")


@cache
def _proc_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return None


def cpu_has_native_bf16(cpuinfo: str | None = None, unknown: bool = True) -> bool:
    """Whether the CPU computes bfloat16 natively (AMX or AVX512-BF16 flags in ``/proc/cpuinfo``).

    Without them oneDNN emulates bf16 and ``bf16-mixed`` training is slower than float32: measured 2.0-2.5x
    slower for every model on an AVX512F Xeon without them (``benchmarks/results/train_speed.md``). Where the
    flags cannot be read (not Linux), it answers ``unknown``: ``True`` lets a user who asked for bf16 judge.
    """
    cpuinfo = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    if cpuinfo is None:
        return unknown
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"amx_bf16", "avx512_bf16"})
