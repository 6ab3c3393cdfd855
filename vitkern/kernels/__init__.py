"""Kernels: Triton (`vitkern.kernels.triton`) and the compiled CUDA extension (`vitkern.kernels.cuda`).

Kernels and their launchers never import `vitkern.model` or `vitkern.ops`; the ops layer calls them.
"""
