"""One exception type, :class:`HelmError`, for every input problem a user can fix: the CLI prints ``str(error)``
(no traceback) and exits with ``error.exit_code`` (statuses in :data:`helm_dask.cli.EXIT_CODES`), the Python
API raises it, and the message names the file and says what to do, so that it reads well on its own, on one
line."""

from __future__ import annotations

import os


class HelmError(Exception):
    """A problem with the user's input or environment, with the fix spelled out.

    Parameters
    ----------
    message : str
        What is wrong, in one sentence.
    path : str or os.PathLike, optional
        The file or store concerned; printed first.
    hint : str, optional
        What to do about it.
    exit_code : int
        Exit status the CLI uses (2 = bad input, 3 = the output cannot be written; see
        :data:`helm_dask.cli.EXIT_CODES`).
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike | None = None, hint: str | None = None, exit_code: int = 2
    ):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.hint = hint
        self.exit_code = exit_code
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text = f"{text.rstrip('.')}. {self.hint}"
        # one line, whatever a wrapped library message holds (YAML and NIfTI readers quote multi-line context)
        return " ".join(text.splitlines())
