"""ctrlkit tests (a package, so an unrelated site-packages `tests`, e.g. torch-fidelity's, cannot shadow it)."""
