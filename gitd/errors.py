"""Errors that carry a message for the user; the edges (SSH, HTTP, CLI) turn them into output."""


class DevflowError(Exception):
    """A refusal the user can act on. `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(DevflowError):
    status = 400


class Unauthorized(DevflowError):
    status = 401


class Forbidden(DevflowError):
    status = 403


class NotFound(DevflowError):
    status = 404


class Conflict(DevflowError):
    status = 409


class TooMany(DevflowError):
    """Too many requests at once from one user: try again once some have ended."""

    status = 429
