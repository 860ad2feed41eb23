"""Training callbacks: sample grids, export, controllability, checkpoints, the resumable end of a run."""
