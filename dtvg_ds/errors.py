"""The run-time outcomes an entry point turns into an exit code (see `dtvg_ds.cli`); the
errors of one subject live with it (ConfigError in config, ArtifactError in artifacts, ...)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run-time problem the user can act on (message names it): exit code 2."""


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was written and the run stopped cleanly: exit 3."""
