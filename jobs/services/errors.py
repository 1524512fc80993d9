"""What the services raise when a rule refuses a request: one family, so
each interface translates it in one place (the API to its error shape and
status, the CLI to a message)."""


class JobError(Exception):
    """A rule refused the request; `message` says why, in words the caller
    can act on."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(JobError):
    """A value the caller sent breaks a rule (the API answers 400). `field`
    names it as the request spells it: `model_name`, `rows[3].prompt`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    @property
    def detail(self) -> str:
        return with_field(self.field, self.message)

    def renamed(self, old: str, new: str) -> "InvalidInput":
        """The same error with the field `old` (and what is inside it)
        called `new`, for a caller whose request names its input otherwise."""
        return InvalidInput(_rename(self.field, old, new), _rename(self.message, old, new))


class JobConflict(JobError):
    """The job is not in a state that allows this (the API answers 409)."""


class LimitReached(JobError):
    """An operator's limit is reached (the API answers 429); `code` names
    which, for clients that act on it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def with_field(field: str, message: str) -> str:
    """ "rows[3]: ..." as it is; "may not be blank" as "title: may not be blank"."""
    head = field.split(".")[0]
    if not field or message.startswith((f"{head}:", f"{head}.", f"{head}[")):
        return message
    return f"{field}: {message}"


def _rename(text: str, old: str, new: str) -> str:
    return (
        new + text.removeprefix(old)
        if text == old or text.startswith((f"{old}.", f"{old}[", f"{old}:"))
        else text
    )
