"""State set up for the length of a block and settled back after it, also when a
KeyboardInterrupt lands on any line in between, the first line of a ``finally`` included."""

from __future__ import annotations

from collections.abc import Callable, Generator


def settled(setup: Callable[[], None], settle: Callable[[], None]) -> Generator[None, None, None]:
    """For a context manager's generator to ``yield from``: runs ``setup``, yields once, then
    ``settle``, also after an exception or an interrupt in either. ``settle`` must be
    idempotent: it runs twice (an interrupt on the line that calls the first skips it, not the
    second), and from its start again after each interrupt inside it; the first such interrupt
    is raised once it has run through."""
    interrupts: list[KeyboardInterrupt] = []

    def through() -> None:
        while True:
            try:
                settle()
            except KeyboardInterrupt as error:  # settle again, to its end
                interrupts.append(error)
            else:
                break

    # The try/finally is in this generator's own frame, which the context manager's exit
    # resumes through the caller's `yield from` without a check for pending interrupts (CPython
    # makes none as a generator resumes into a yield from): none lands between.
    try:
        try:
            setup()
            yield
        finally:
            through()
    finally:
        through()  # again: an interrupt on the line that calls the first skipped it
        if interrupts:
            raise interrupts[0]
