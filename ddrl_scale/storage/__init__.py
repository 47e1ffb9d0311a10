"""Reading and writing the run's files safely: the bottom layer, next to `runtime` (imports nothing
of the project). `run_files`: crash-consistent writes and a tolerant JSON-lines reader;
`safe_load`: checkpoint readers that refuse code (no pickle runs)."""
