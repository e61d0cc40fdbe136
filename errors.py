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


def parse_json(text: str | bytes, where: str, what: str):
    """JSON text from a user's file (a config, a manifest, a safetensors header) -> the value, or one UserError
    naming the file. Deep nesting (RecursionError), integers too long to convert and invalid UTF-8 included."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(where, f"expected a JSON {what}: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and int-digit limits are ValueErrors
        raise UserError(where, f"expected a JSON {what}: {e}") from None


def read_json(path: str | Path, expected: str, what: str):
    """A JSON file the user handed over (a config in a model folder or a bundle): a missing or malformed one is
    a UserError naming the file. `expected`: the file a missing one should have been; `what`: what it holds."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(str(path), f"no such file; expected {expected}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"expected a JSON {what}: {e}") from None
    return parse_json(text, str(path), what)


def read_json_object(path: str | Path, expected: str, what: str) -> dict:
    """read_json for a file that must hold a JSON object."""
    value = read_json(path, expected, what)
    if not isinstance(value, dict):
        raise UserError(str(path), f"expected a JSON object ({what}), got {type(value).__name__}")
    return value
