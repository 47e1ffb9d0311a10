"""Launch scripts and templates, shipped as `ddrl_scale.launchers` (no Python logic here)."""
