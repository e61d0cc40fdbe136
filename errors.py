"""The one error type a user sees: it names the file or option and what was expected.

The CLI turns it into `vtprune: error: <where>: <what>` on stderr and exit code 2, without a traceback.
"""

import json
from pathlib import Path


class UserError(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


def read_json(path: str | Path, expected: str, what: str):
    """A JSON file the user handed over (a config in a model folder or a bundle): a missing or malformed one is
    a UserError naming the file. `expected`: the file a missing one should have been; `what`: what it holds."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(str(path), f"no such file; expected the bundle's {expected}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(str(path), f"expected a JSON {what}: {e}") from None
