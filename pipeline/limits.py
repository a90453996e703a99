"""Every bound on a quantity a user controls, in one place; each one is a setting of `devflow up`.

A user who goes over a limit gets a refusal that names it and the setting that raises it, and nothing
is stored. `gitd.settings.Settings` inherits these fields, so each has a `--max-...` flag and a
`DEVFLOW_MAX_...` environment variable; the composition root hands the one `Limits` to every part.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import PipelineInputError

KiB, MiB, GiB = 1024, 1024**2, 1024**3
# execve refuses one "KEY=value" string over MAX_ARG_STRLEN (32 pages) and the whole environment past about a
# quarter of the stack limit (2 MiB by default); config vars stay well inside both, with room for the platform's.
MAX_ARG_STRLEN = 128 * KiB
CONFIG_BYTES_CEILING = 1 * MiB
# Files the daemon reads in a pushed tree whose size no setting needs: a version or a directory name on one line
# (.python-version, runtime.txt, .static), and a module scanned for a WSGI app (larger ones are not scanned).
MARKER_FILE_BYTES = 4 * KiB
SCANNED_SOURCE_BYTES = 1 * MiB
# JSON the daemon parses (app.json, package.json) nests a handful of levels; the parser recurses, so bound it.
MAX_JSON_DEPTH = 64
# requirements.txt files included with -r/-c that the daemon reads for the cache key; beyond, pip alone reads them.
MAX_REQUIREMENT_FILES = 100


class LimitExceeded(PipelineInputError):
    """A request goes over a limit; the message names the limit and the setting that raises it."""


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True)

    # pushes and builds
    max_push_bytes: int = Field(2 * GiB, ge=0, description="largest pack one push may send, in bytes (0: no limit)")
    max_app_bytes: int = Field(2 * GiB, ge=MiB, description="largest uncompressed tree a push may expand to, "
                                                            "submodules included, in bytes")
    max_app_files: int = Field(200_000, ge=100, description="most files and directories a pushed tree may hold")
    max_disk_bytes: int = Field(8 * GiB, ge=64 * MiB, description="disk one app's builds and dependency caches "
                                                                  "may use, in bytes")
    max_submodules: int = Field(64, ge=0, description="most submodules one push may bring, nested ones included")
    submodule_timeout: float = Field(600.0, gt=0, description="seconds one submodule fetch may take")
    # what each unit of an app (runtime.local.unit_bounds) may use, whatever the app asks for
    max_process_memory: int = Field(2 * GiB, ge=64 * MiB, description="memory each app process may use with what "
                                                                      "it starts, and the most resources:set may "
                                                                      "give it, in bytes")
    max_build_memory: int = Field(4 * GiB, ge=64 * MiB, description="memory each build, release phase and deploy "
                                                                    "script may use with what it starts, in bytes")
    max_pids_per_app: int = Field(4096, ge=32, description="most processes and threads each app process, build or "
                                                          "release phase may run at once, and the app's user in all")
    # what a push or a command describes
    max_procfile_bytes: int = Field(64 * KiB, ge=KiB, description="largest Procfile, in bytes")
    max_app_json_bytes: int = Field(256 * KiB, ge=KiB, description="largest app.json, in bytes")
    max_parsed_manifest_bytes: int = Field(1 * MiB, ge=16 * KiB, description="largest dependency manifest the "
                                                                             "daemon itself parses (package.json, "
                                                                             "pyproject.toml, go.mod, "
                                                                             "requirements.txt with what it "
                                                                             "includes), in bytes")
    max_manifest_bytes: int = Field(64 * MiB, ge=MiB, description="largest lockfile or other dependency file a build "
                                                                  "only hashes or copies (package-lock.json, "
                                                                  "poetry.lock, uv.lock, Pipfile, .npmrc...), in "
                                                                  "bytes")
    max_process_types: int = Field(32, ge=1, description="most process types one app may declare")
    max_checks_per_type: int = Field(5, ge=1, description="most app.json health checks one process type may have")
    max_check_seconds: float = Field(600.0, gt=0, description="longest one app.json health check may take in all "
                                                              "(initialDelay + attempts x (timeout + wait))")
    max_replicas_per_type: int = Field(32, ge=1, description="most processes of one type (ps:scale, formation)")
    max_replicas_per_app: int = Field(64, ge=1, description="most processes of one app, all types together")
    max_config_vars: int = Field(500, ge=1, description="most config vars one app may have")
    max_config_bytes: int = Field(64 * KiB, ge=KiB, le=CONFIG_BYTES_CEILING,
                                  description="largest total size of one app's config vars (keys and values), "
                                              "in bytes")
    max_domains_per_app: int = Field(100, ge=1, description="most custom domains one app may have")
    max_collaborators_per_app: int = Field(100, ge=1, description="most collaborators one app may have")
    max_apps_per_user: int = Field(100, ge=1, description="most apps one user may own")
    max_keys_per_user: int = Field(50, ge=1, description="most SSH keys one user may have")
    max_tokens_per_user: int = Field(50, ge=1, description="most active HTTP tokens one user may have")
    # the HTTP front door
    max_request_head_bytes: int = Field(64 * KiB, ge=4 * KiB, description="largest HTTP request head the daemon "
                                                                          "reads (431 past it), in bytes")
    max_api_body_bytes: int = Field(1 * MiB, ge=4 * KiB, description="largest REST API request body, in bytes")
    max_fetch_request_bytes: int = Field(128 * MiB, ge=MiB, description="largest (inflated) body of a fetch or "
                                                                        "clone request over HTTP, in bytes")
    max_request_headers: int = Field(100, ge=16, description="most header fields in one HTTP request (431 past "
                                                             "it)")
    max_pipelined_requests: int = Field(16, ge=1, description="most HTTP requests a client may send ahead of the "
                                                              "answers on one connection (the connection closes "
                                                              "past it)")
    max_http_connections: int = Field(256, ge=1, description="most HTTP connections open at once (503 past it)")
    max_connections_per_client: int = Field(64, ge=1, description="most HTTP, and most unauthenticated SSH, "
                                                                  "connections one client address may hold at once")
    max_ssh_unauthenticated: int = Field(64, ge=1, description="most SSH connections still authenticating at once, "
                                                               "over all clients")
    max_auth_tries: int = Field(6, ge=1, description="most keys one SSH connection may offer, as OpenSSH's "
                                                     "MaxAuthTries")
    max_ssh_connections: int = Field(256, ge=1, description="most SSH connections open at once, authenticated or not")
    max_ssh_sessions: int = Field(10, ge=1, description="most sessions (git or commands) open at once on one SSH "
                                                        "connection, as OpenSSH's MaxSessions")
    max_commands_per_user: int = Field(4, ge=1, description="most management commands one user may have running at "
                                                            "once (SSH and API together)")
    max_log_lines: int = Field(10_000, ge=100, description="most log lines one `logs` answer holds (--tail 0 means "
                                                           "this many)")
    max_log_followers: int = Field(64, ge=1, description="most `logs -f` followers at once, over all users")
    max_log_followers_per_user: int = Field(4, ge=1, description="most `logs -f` one user may have open at once")
    request_head_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send a request head")
    request_idle_timeout: float = Field(60.0, gt=0, description="seconds a client may pause while sending a "
                                                                "request body or reading an answer")
    # what one app keeps on disk
    log_max_bytes: int = Field(16 * MiB, ge=64 * KiB, description="an app's log is rotated to app.log.1 past this "
                                                                  "size, and one deployment's log stops there, in "
                                                                  "bytes")
    max_history: int = Field(100, ge=10, description="deployments (with their logs) and releases kept per app; older "
                                                     "ones are removed")

    def refuse(self, name: str, what: str) -> LimitExceeded:
        """`what` went over the limit `name`: the message says what the limit is and how to raise it."""
        value = getattr(self, name)
        flag = "--" + name.replace("_", "-")
        return LimitExceeded(f"{what}: the limit is {_shown(name, value)} (an admin can raise it with "
                             f"devflow up {flag})")


def _shown(name: str, value: float) -> str:
    if name.endswith("_timeout"):
        return f"{value:g} seconds"
    return byte_size(int(value)) if name.endswith(("_bytes", "_memory")) else f"{value:g}"


def byte_size(value: int) -> str:
    """A size as people write it: 64 KiB, 2 GiB, 1000 bytes."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} bytes"

