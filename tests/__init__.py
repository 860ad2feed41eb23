"""ctrlkit tests; a regular package so `tests.*` imports resolve here, not to a site-packages `tests` (torch-fidelity
0.4 installs one)."""
