"""The sections of scripts/gpu_check.py that run the trainer: (c) its throughput against a
bare loop, (d) torchrun over the devices present with a rank killed and the run resumed."""
