"""Telemetry: model FLOPs and MFU, device telemetry (NVML, or psutil without it), per-step phase
timers, CPU peak-memory measurement, and the `ddrl plan` parallel-plan model."""
