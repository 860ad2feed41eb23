"""Hydra configs of ctrlkit (package data; ``lightning_modules.commands.config_checks.CONF_DIR`` points here)."""
