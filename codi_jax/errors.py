"""User-facing errors: one line naming the file or argument and the problem, never a traceback."""

from __future__ import annotations

import contextlib
import sys


class InputError(Exception):
  """Bad user input (path, file contents, flag value). Its message is the whole report."""


@contextlib.contextmanager
def exit_on_input_error(prog: str):
  """Turns an InputError raised inside the block into `prog: error: ...` on stderr and exit 2."""
  try:
    yield
  except InputError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
