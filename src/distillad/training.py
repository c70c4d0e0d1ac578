"""The trainer settings ``fit`` and ``benchmark`` accept (no Lightning import, so the CLI starts fast)."""

#: Training precisions handed to Lightning (inference and export always run in float32).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")
#: ``ddp``: distributed data parallel over ``devices`` (GPUs, or CPU processes with gloo).
STRATEGIES = ("auto", "ddp")
