"""The one exception type for user mistakes.

Anything raised as :class:`FactoryError` is the user's to fix (bad spec, bad file, impossible
shape). Its message is one line that names what is wrong and how to fix it; the CLI prints it and
exits with code 2. Every other exception is a bug in peg-factory and keeps its traceback.
"""


class FactoryError(Exception):
    """A user-facing error with a one-line, actionable message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Interrupted(KeyboardInterrupt):
    """A long-running step stopped because the user asked it to (Ctrl-C); the CLI exits with 130.

    Raised by worker threads, which never see the signal themselves: the main thread receives
    the ``KeyboardInterrupt`` and tells them to stop (see ``factory.training.train.train(should_stop=)``).
    """
