"""Flag values of the search's commands, parsed in one place for `nanorun tune/plan/profile`
(search/cli.py) and `nanorun provision` (search/provision_cli.py), so that neither command
module imports the other for it (cli.py registers provision's parser: one direction)."""

from __future__ import annotations


def ints(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated positive integers of `flag`; a ValueError naming the flag otherwise."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs positive integers, got {text!r}")
    return values
