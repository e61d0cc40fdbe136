"""The one error type a user sees: it names the file or option and what was expected.

The CLI turns it into `vtprune: error: <where>: <what>` on stderr and exit code 2, without a traceback.
"""


class UserError(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what
