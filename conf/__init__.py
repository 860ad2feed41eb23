"""Hydra configs of ctrlkit (shipped as package data; ``lightning_modules.config_checks.CONF_DIR`` points here)."""
