"""Errors about checkpoints: what was found, and what is supported."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or of an unsupported kind."""
