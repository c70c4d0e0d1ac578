"""The distillation methods, one folder each, anomalib style."""
