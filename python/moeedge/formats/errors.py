"""Errors about checkpoints: what was found, and what is supported."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or of an unsupported kind."""


def shown(value, limit: int = 80) -> str:
    """repr(value) for an error message, cut short: a hostile file's value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def shown_name(name) -> str:
    """A file or tensor name a checkpoint gives, for an error message: repr'd (one line), cut short."""
    return shown(name, 200)


def shown_list(names, limit: int = 3) -> str:
    """The first few of a list a checkpoint may make huge, and how many in all."""
    head = ", ".join(shown_name(n) for n in names[:limit])
    return head if len(names) <= limit else f"{head} and {len(names) - limit} more ({len(names)} in all)"


def brief(text: str, limit: int = 300) -> str:
    """Another library's message about a checkpoint (a parser's error): one line, cut short."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
