"""PyTorch interop (the `[torch]` extra): BackdoorBench checkpoints in and out.

`backdoorbench.load(path)` / `backdoorbench.save(path, variables, ...)`; `export.export_run` writes
a trained run's model as such a file (`python -m jaxbd.export`); `torch_models` holds the
PyTorch twins of jaxbd's models. Import the submodules directly; they import torch lazily.
"""
