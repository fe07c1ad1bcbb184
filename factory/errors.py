"""The one exception type for user mistakes.

Anything raised as :class:`FactoryError` is the user's to fix (bad spec, bad file, impossible
shape). Its message is one line that names what is wrong and how to fix it; the CLI prints it and
exits with code 2. Every other exception is a bug in peg-factory and keeps its traceback.

Errors are worded in the API's terms: ``param`` names the argument (or config field) at fault, and
``str(error)`` starts with it (``"out: directory /x is not writable; choose another"``). The CLI
replaces that name by its own flag (``--out: ...``), so code below the CLI never names a flag.
"""


class FactoryError(Exception):
    """A user-facing error with a one-line, actionable message; ``param``: the API argument at fault."""

    def __init__(self, message: str, param: str | None = None):
        self.message = " ".join(str(message).split())
        self.param = param
        super().__init__(f"{param}: {self.message}" if param else self.message)


class Interrupted(KeyboardInterrupt):
    """A long-running step stopped because the user asked it to (Ctrl-C); the CLI exits with 130.

    Raised by worker threads, which never see the signal themselves: the main thread receives
    the ``KeyboardInterrupt`` and tells them to stop (see ``factory.training.train.train(should_stop=)``).
    """
