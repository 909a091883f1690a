"""Errors about checkpoints: what was found, and what is supported."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or of an unsupported kind."""


def shown(value, limit: int = 80) -> str:
    """repr(value) for an error message, cut short: a hostile file's value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
