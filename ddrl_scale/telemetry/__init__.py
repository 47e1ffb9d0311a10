"""Throughput accounting: model FLOPs of a DDRL iteration and the measured matmul peak (for MFU)."""
