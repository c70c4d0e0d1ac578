"""retain_freed_memory: a freed large tensor's pages are reused instead of being mapped and faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distillad import cli

#: Six training steps of three convolutions (64 MiB activations); prints the page faults of the last step and
#: how much the resident memory grew, at the end and at its peak. The first argument says whether to call
#: retain_freed_memory first. Its own process: the setting is process-wide.
STEPS = """
import resource, sys
import torch
from distillad.memory import retain_freed_memory

if sys.argv[1] == "retain" and not retain_freed_memory():
    print("unsupported")
    raise SystemExit


def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()


torch.manual_seed(0)
torch.set_num_threads(1)
layers = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 1), torch.nn.ReLU6(inplace=True),
                             torch.nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.nn.ReLU6(inplace=True),
                             torch.nn.Conv2d(64, 16, 1))
images = torch.rand(16, 16, 128, 128)
start = resident()
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layers(images).square().mean().backward()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults, resident() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start)
"""


#: Calls retain_freed_memory, then runs the steps (its first argument) in a new process with malloc's defaults.
PARENT = """
import subprocess, sys
from distillad.memory import retain_freed_memory

retain_freed_memory()
print(subprocess.run([sys.executable, "-c", sys.argv[1], "default"], capture_output=True, text=True).stdout)
"""


def _last_step(mode: str) -> tuple[int, int, int] | None:
    command = [sys.executable, "-c", PARENT, STEPS] if mode == "child" else [sys.executable, "-c", STEPS, mode]
    # Tests that run the command line in this process have set malloc's variables here; "default" means without them.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
    return None if output.strip() == "unsupported" else tuple(int(word) for word in output.split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_tensor_pages_are_reused_instead_of_faulted_in_again() -> None:
    retained = _last_step("retain")
    if retained is None:
        pytest.skip("this C library has no mallopt (not glibc)")
    default_faults, _, default_peak = _last_step("default")
    faults, growth, _ = retained
    # With malloc's defaults the step's large tensors are mapped (or, freed at the heap's top, trimmed) anew each
    # step: about 320,000 faults of 4 KiB pages (fewer where transparent huge pages are always on). Retained, the
    # last step reuses memory already faulted in (0-12,288 faults measured).
    assert default_faults > 0
    assert faults < default_faults / 10
    # The process keeps about its peak (1.18x measured), not a heap that grows by a step's memory every step.
    assert growth < 1.5 * default_peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_processes_started_afterwards_retain_freed_memory_too() -> None:
    if _last_step("retain") is None:
        pytest.skip("this C library has no mallopt (not glibc)")
    child_faults, _, _ = _last_step("child")
    default_faults, _, _ = _last_step("default")
    assert child_faults < default_faults / 10  # benchmark cells and DDP ranks are such processes


def test_the_command_line_retains_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(sys, "argv", ["distillad", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [True]
