"""Launching runs: one host (torchrun) or a SLURM cluster (rendered sbatch scripts)."""
