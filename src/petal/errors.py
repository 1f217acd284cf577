"""petal's exceptions.

Everything a user can cause (bad data, bad options, missing packages) raises a
`PetalError`. It subclasses `ValueError`, as in scikit-learn, and the CLI prints
its message in one line without a traceback. Anything else is a bug in petal.
"""


class PetalError(ValueError):
    """A problem with the user's input or environment, explained in the message."""


class DataError(PetalError):
    """The labeled data cannot be used as given (no classes, empty class, bad CSV...)."""


class ImageError(PetalError):
    """One image cannot be read or decoded. Batches report it and skip the image."""


class NothingUsableError(PetalError):
    """Every input failed, so the step produced nothing."""



class CacheError(PetalError):
    """The embedding cache lacks a wanted embedding, or a shard went bad while a run read it."""
