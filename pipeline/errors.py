"""Errors the pipeline raises for the user; the edges show their message."""


class PipelineInputError(ValueError):
    """A request the user can fix: a bad key, an unknown release, a bad formation."""


class DeployFailed(Exception):
    """A deployment stopped at `stage`; the live release is untouched."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message
