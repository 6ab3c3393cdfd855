"""Triton kernels, one file per op family: the @triton.jit kernels and their launchers
(allocate, grid, launch). Each file also lists its `KernelSpec`s in `AUDIT_SPECS` for
`python -m vitkern.audit`. Nothing here imports `vitkern.ops` or `vitkern.model`.
"""
