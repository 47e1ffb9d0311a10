"""Fused kernels for the DDRL losses, imported as `ddrl_scale.kernels`.

Filled by the fused-kernels work; the torch references live in `ddrl_scale.algo`.
"""
