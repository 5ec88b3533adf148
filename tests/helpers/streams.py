"""Data streams for trainer tests."""


class Interrupt(Exception):
    """Raised by ``interrupted`` in place of a batch: a crash in the middle of training."""


def interrupted(stream, after: int):
    """``stream``'s batches, raising ``Interrupt`` instead of batch number ``after``."""
    for i, batch in enumerate(stream):
        if i == after:
            raise Interrupt
        yield batch
