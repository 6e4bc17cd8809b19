"""Counts in words, for what a household reads: the web page, a night's reasons, the log."""


def counted(n: int, noun: str) -> str:
    """`1 label`, `3 labels` (nouns whose plural takes an `s`)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
