"""The HTTP application: status page, REST API and smart git, in that order of routes."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette

from gitd.commands.command_threads import CommandThreads
from gitd.git.git_service import GitService
from gitd.http.api import api_routes
from gitd.http.smart_git import git_routes
from gitd.http.status_page import ServiceInfo, status_routes
from gitd.identity.directory import Directory
from gitd.identity.roles import Actor
from gitd.management import Management
from pipeline.limits import Limits


def build_app(
    info: ServiceInfo, directory: Directory, git: GitService, management_for: Callable[[Actor], Management],
    limits: Limits, commands: CommandThreads,
) -> Starlette:
    return Starlette(routes=[
        *status_routes(info),
        *api_routes(directory, management_for, limits, commands),
        *git_routes(git, directory, limits),
    ])
