"""ctrlkit tests. A regular package, so that ``tests.helpers`` resolves here even when an installed distribution
(torch-fidelity 0.4 does) puts a top-level ``tests`` package into site-packages."""
