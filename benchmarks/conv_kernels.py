"""Where DMDD's trainable pass spends its time inside oneDNN: convolution time by pass, kind and kernel.

    python benchmarks/conv_kernels.py                       # 2 threads, 32 images (16 pairs), 256 px
    python benchmarks/conv_kernels.py --quick --out /tmp/k  # a check that it runs (64 px, 4 images)

The student's forward + backward on both images of each pair (the step's limit in ``train_speed.md``) runs once
under ``torch.backends.mkldnn.verbose`` after warm-up steps; each oneDNN primitive it executes is grouped by pass
(forward, backward data, backward weights), depthwise or dense, kernel size and the implementation oneDNN chose.
Their sum against the step's wall time says how much of the step is convolution at all.

The 5x5 depthwise weight gradients run on oneDNN's generic ``jit`` kernel (its ``jit_dw`` kernel takes them only
for 3x3), so they are also timed against a reformulation: the gradient of a depthwise convolution is, per image
and channel, the correlation of the input with the output gradient, i.e. one convolution with N x C groups whose
kernels are the output gradients (dilated by the stride), summed over the batch. Writes ``OUT.json`` and
``OUT.md`` (default ``benchmarks/results/conv_kernels``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame

from distillad.components import cosine_distance_map
from distillad.memory import retain_freed_memory
from distillad.models.dmdd.torch_model import DMDDModel


def student_step(model: DMDDModel, images: torch.Tensor, teacher: list[torch.Tensor]) -> None:
    """Forward + backward of the decoupled student and PMN against the teacher (both branches)."""
    student = model.student_features(images)
    loss = sum(cosine_distance_map(t, s).mean() for maps in student.values() for t, s in zip(teacher, maps))
    loss.backward()


def convolution_groups(verbose_lines: list[str]) -> dict[str, float]:
    """Milliseconds per (pass, depthwise or dense, kernel, implementation) from oneDNN's exec lines."""
    groups: dict[str, float] = defaultdict(float)
    for line in verbose_lines:
        fields = line.strip().split(",")
        if fields[:4] != ["onednn_verbose", "v1", "primitive", "exec"]:
            continue
        if fields[5] != "convolution":
            groups[fields[5]] += float(fields[-1])
            continue
        problem = fields[-2]
        kernel = next((f"{k}x{k}" for k in (1, 3, 5, 7) if f"kh{k}s" in problem), "other")
        kind = "depthwise" if problem.startswith("g") else "dense"
        groups[f"{fields[7]} {kind} {kernel} {fields[6].split(':')[0]}"] += float(fields[-1])
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


def onednn_verbose_lines(call) -> list[str]:
    """The lines oneDNN prints (from C, to file descriptor 1) while ``call`` runs."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                call()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return log.read().splitlines()


def _timed(call, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def depthwise_weight_gradient_by_groups(inputs: torch.Tensor, output_grad: torch.Tensor, kernel: int, stride: int,
                                        padding: int) -> torch.Tensor:
    """dL/dW of a depthwise convolution as one convolution with N x C groups (module docstring)."""
    batch, channels = inputs.shape[:2]
    height, width = output_grad.shape[-2:]
    padded = F.pad(inputs, (padding,) * 4)[..., : (height - 1) * stride + kernel, : (width - 1) * stride + kernel]
    gradient = F.conv2d(padded.contiguous().reshape(1, batch * channels, *padded.shape[-2:]),
                        output_grad.contiguous().reshape(batch * channels, 1, height, width),
                        dilation=stride, groups=batch * channels)
    return gradient.reshape(batch, channels, kernel, kernel).sum(0).unsqueeze(1)


def depthwise_5x5_shapes(model: DMDDModel, images: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(channels, padded input size, stride, padding) of each 5x5 depthwise convolution in the student."""
    shapes = []

    def record(module: torch.nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        if module.kernel_size == (5, 5) and module.groups == module.in_channels > 1:
            size, stride = inputs[0].shape[-1], module.stride[0]
            if isinstance(module, Conv2dSame):  # TensorFlow "same": pads inside its forward, more after than before
                size += max((math.ceil(size / stride) - 1) * stride + 5 - size, 0)
            shapes.append((module.in_channels, size, stride, module.padding[0]))

    hooks = [m.register_forward_hook(record) for m in model.student.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.student(model.teacher.normalize(images))
    for hook in hooks:
        hook.remove()
    return shapes


def depthwise_5x5_row(batch: int, channels: int, size: int, stride: int, padding: int) -> dict:
    """oneDNN's weight gradient of one 5x5 depthwise convolution against the batch-as-groups one, timed."""
    inputs = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, 5, 5)
    out = (size + 2 * padding - 5) // stride + 1
    grad = torch.randn(batch, channels, out, out).contiguous(memory_format=torch.channels_last)

    def onednn() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(grad, inputs, weight, None, [stride] * 2, [padding] * 2, [1, 1],
                                                   False, [0, 0], channels, [False, False, True])[1]

    def by_groups() -> torch.Tensor:
        return depthwise_weight_gradient_by_groups(inputs, grad, 5, stride, padding)

    reference = onednn()
    return {"channels": channels, "input": size, "stride": stride, "padding": padding,
            "onednn_ms": _timed(onednn), "groups_ms": _timed(by_groups),
            "relative_difference": float((by_groups() - reference).abs().max() / reference.abs().max())}


def run(args: argparse.Namespace) -> dict:
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DMDDModel(msn=False).train()
    images = torch.rand(args.images, 3, args.image_size, args.image_size)
    with torch.no_grad():
        teacher = model.teacher_features(images)
    for _ in range(args.warmup):
        student_step(model, images, teacher)
    step_ms = _timed(lambda: student_step(model, images, teacher), repeats=3)
    groups = convolution_groups(onednn_verbose_lines(lambda: student_step(model, images, teacher)))
    rows = [depthwise_5x5_row(args.images, *shape) for shape in depthwise_5x5_shapes(model, images)]
    return {"threads": args.threads, "images": args.images, "image_size": args.image_size,
            "step_ms": step_ms, "onednn_convolution_ms": sum(v for k, v in groups.items() if " " in k),
            "groups_ms": groups, "depthwise_5x5_weight_gradients": rows}


def markdown(result: dict) -> str:
    lines = [f"# DMDD student forward + backward inside oneDNN ({result['images']} images, {result['image_size']} px, "
             f"{result['threads']} threads, float32)", "",
             f"Step (wall): {result['step_ms']:.0f} ms; oneDNN convolutions: {result['onednn_convolution_ms']:.0f} ms "
             f"({100 * result['onednn_convolution_ms'] / result['step_ms']:.0f} %).", "",
             "| pass, kind, kernel, implementation | ms | share of step |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {100 * ms / result['step_ms']:.1f} % |" for name, ms in result["groups_ms"].items()]
    lines += ["", "5x5 depthwise weight gradients: oneDNN against the batch-as-groups convolution", "",
              "| channels | input | stride | oneDNN ms | groups ms | relative difference |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['channels']} | {r['input']} | {r['stride']} | {r['onednn_ms']:.1f} | {r['groups_ms']:.1f} | "
              f"{r['relative_difference']:.1e} |" for r in result["depthwise_5x5_weight_gradients"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=32, help="both images of 16 pairs")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 px, 4 images, 1 warm-up step")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "conv_kernels")
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.warmup = 4, 64, 1
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
