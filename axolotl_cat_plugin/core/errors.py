"""The one exception type users see for their own mistakes."""


class CatError(ValueError):
    """A skill, config or export request that CAT refuses; the message says what to change.

    A ValueError so that pydantic validators wrapping it report it as a validation error.
    """
