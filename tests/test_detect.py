"""Procfile, app.json and stack detection over good and bad inputs, including the messages users see."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from pipeline.app_json import AppJson, AppJsonError, HealthCheck, parse_app_json
from pipeline.detect import DetectError, detect
from pipeline.limits import Limits
from pipeline.procfile import ProcfileError, parse_procfile

APPS = Path(__file__).parent / "apps"
LIMITS = Limits()


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


# Procfile


def test_procfile_types_commands_comments_and_blank_lines():
    text = "# processes\n\nweb: gunicorn app:app --bind 0.0.0.0:$PORT\r\nworker:python3 worker.py  \n" \
           "release-phase: ./migrate.sh && echo done\nclock_2: python3 -c 'print(1)'  # not a comment\n"
    assert parse_procfile(text, LIMITS) == {
        "web": "gunicorn app:app --bind 0.0.0.0:$PORT",
        "worker": "python3 worker.py",
        "release-phase": "./migrate.sh && echo done",
        "clock_2": "python3 -c 'print(1)'  # not a comment",
    }


def test_procfile_keeps_colons_in_commands():
    assert parse_procfile("web: python3 -m http.server --bind ::1 $PORT", LIMITS) == {
        "web": "python3 -m http.server --bind ::1 $PORT"}


@pytest.mark.parametrize("text, message", [
    ("web: a\nweb: b\n", "Procfile line 2: the 'web' process is already declared on line 1"),
    ("web: a\n\nthis is not a process\n", "Procfile line 3: expected 'type: command'"),
    ("web a\n", "Procfile line 1: expected 'type: command'"),
    ("my web: a\n", "Procfile line 1: expected 'type: command'"),
    ("web.1: a\n", "Procfile line 1: expected 'type: command'"),
    ("# comment\nworker:\n", "Procfile line 2: the 'worker' process has no command"),
    ("", "Procfile declares no processes"),
    ("# only a comment\n\n", "Procfile declares no processes"),
])
def test_procfile_errors_name_the_line(text, message):
    with pytest.raises(ProcfileError) as error:
        parse_procfile(text, LIMITS)
    assert message in str(error.value)


# app.json


def test_app_json_dokku_and_heroku_keys():
    app = parse_app_json(json.dumps({
        "name": "ignored", "description": "unknown keys are fine",
        "healthchecks": {"web": [
            {"type": "startup", "name": "web check", "path": "/health", "content": "ok", "attempts": 3, "wait": 1,
             "timeout": 2, "initialDelay": 0, "port": 5000, "description": "ignored"},
            {"path": "/ready"},
        ]},
        "scripts": {"dokku": {"predeploy": "python manage.py migrate", "postdeploy": "echo done"},
                    "postdeploy": "heroku review apps only"},
        "formation": {"web": {"quantity": 2}, "worker": {"quantity": 0, "size": "basic"}, "clock": {}},
        "env": {"PLAIN": "v", "WITH_VALUE": {"value": "w", "description": "d"}, "SECRET": {"required": True},
                "GENERATED": {"generator": "secret"}},
        "cron": [{"command": "python3 cleanup.py", "schedule": "@daily"}],
    }), LIMITS)
    assert app.healthchecks == {"web": [
        HealthCheck(type="startup", name="web check", path="/health", content="ok", attempts=3, timeout=2, wait=1,
                    initial_delay=0),
        HealthCheck(type="startup", name="web startup /ready", path="/ready", content=None, attempts=3, timeout=5,
                    wait=5, initial_delay=0),
    ]}
    assert (app.predeploy, app.postdeploy) == ("python manage.py migrate", "echo done")
    assert app.formation == {"web": 2, "worker": 0, "clock": 1}
    assert app.env == {"PLAIN": "v", "WITH_VALUE": "w"}
    assert app.cron == [{"command": "python3 cleanup.py", "schedule": "@daily"}]


def test_app_json_empty_object_means_defaults():
    assert parse_app_json("{}", LIMITS) == AppJson()
    assert parse_app_json('{"scripts": {"postdeploy": "x"}}', LIMITS).postdeploy is None


@pytest.mark.parametrize("document, message", [
    ("{", "app.json is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ("[]", "app.json: the top level must be an object"),
    ('{"healthchecks": []}', "app.json: healthchecks must be an object"),
    ('{"healthchecks": {"web": {"path": "/"}}}', "app.json: healthchecks.web must be a list of checks"),
    ('{"healthchecks": {"web": ["/"]}}', "app.json: healthchecks.web[0] must be an object"),
    ('{"healthchecks": {"web": [{"attempts": "3"}]}}', 'healthchecks.web[0].attempts must be an integer >= 1, got "3"'),
    ('{"healthchecks": {"web": [{"attempts": 0}]}}', "healthchecks.web[0].attempts must be an integer >= 1, got 0"),
    ('{"healthchecks": {"web": [{"attempts": true}]}}', "healthchecks.web[0].attempts must be an integer >= 1"),
    ('{"healthchecks": {"web": [{}, {"timeout": -1}]}}', "healthchecks.web[1].timeout must be a number >= 1"),
    ('{"healthchecks": {"web": [{"path": "health"}]}}', "healthchecks.web[0].path must be a string starting with '/'"),
    ('{"healthchecks": {"web": [{"type": "boot"}]}}', "healthchecks.web[0].type must be 'startup' or 'liveness'"),
    ('{"healthchecks": {"web": [{"content": 200}]}}', "healthchecks.web[0].content must be a string"),
    ('{"healthchecks": {"web": [{"uptime": 10}]}}', "healthchecks.web[0].uptime: uptime checks are not supported"),
    ('{"healthchecks": {"web": [{"command": ["x"]}]}}', "healthchecks.web[0].command: command checks are not"),
    ('{"healthchecks": {"web.1": []}}', "app.json: healthchecks.web.1 is not a process type name"),
    ('{"scripts": []}', "app.json: scripts must be an object"),
    ('{"scripts": {"dokku": "x"}}', "app.json: scripts.dokku must be an object"),
    ('{"scripts": {"dokku": {"predeploy": ["a"]}}}', "app.json: scripts.dokku.predeploy must be a command string"),
    ('{"formation": {"web": 2}}', 'app.json: formation.web must be an object like {"quantity": 1}'),
    ('{"formation": {"web": {"quantity": -1}}}', "app.json: formation.web.quantity must be an integer >= 0"),
    ('{"formation": {"web": {"quantity": 1.5}}}', "app.json: formation.web.quantity must be an integer >= 0"),
    ('{"env": {"A": 1}}', 'app.json: env.A must be a string or an object with a "value"'),
    ('{"env": {"A": {"value": true}}}', "app.json: env.A.value must be a string"),
    ('{"env": {"BAD-NAME": "x"}}', "app.json: env.BAD-NAME is not an environment variable name"),
    ('{"cron": {"command": "x"}}', "app.json: cron must be a list"),
    ('{"cron": [{"command": "x"}]}', "app.json: cron[0].schedule must be a string, got null"),
])
def test_app_json_errors_name_the_key_path(document, message):
    with pytest.raises(AppJsonError) as error:
        parse_app_json(document, LIMITS)
    assert message in str(error.value)


# detection


def test_fixture_apps_are_detected():
    flask = detect(APPS / "flask", LIMITS)
    assert (flask.stacks, flask.python_manager, flask.procfile) == (("python",), "pip", {})
    node = detect(APPS / "node", LIMITS)
    assert (node.stacks, node.node_manager, node.node_engine) == (("node",), "npm", ">=18")
    assert detect(APPS / "static", LIMITS).stacks == ("static",)
    workers = detect(APPS / "workers", LIMITS)
    assert workers.stacks == () and list(workers.procfile) == ["web", "worker", "release"]
    healthchecks = detect(APPS / "healthchecks", LIMITS)
    assert healthchecks.app_json.healthchecks["web"][0].path == "/health"
    assert healthchecks.app_json.predeploy == "python3 hook.py predeploy"
    assert "Detected app.json: healthchecks for web; predeploy; postdeploy" in healthchecks.notes
    assert detect(APPS / "stdlib", LIMITS).notes == [
        "Detected Procfile: web", "No dependency files found: the Procfile's commands run with the host's tools"]


def test_python_managers_and_versions(tmp_path):
    cases = {
        "pip": ({"requirements.txt": "flask\n"}, "pip", None),
        "uv": ({"pyproject.toml": '[project]\nname = "a"\nversion = "1"\n', "uv.lock": "", ".python-version": "3.12\n"},
               "uv", "3.12"),
        "poetry-lock": ({"pyproject.toml": "[tool.poetry]\nname = 'a'\n", "poetry.lock": ""}, "poetry", None),
        "poetry-no-lock": ({"pyproject.toml": "[tool.poetry]\nname = 'a'\n"}, "poetry", None),
        "pipenv": ({"Pipfile": "[packages]\n", "runtime.txt": "python-3.11.7\n"}, "pipenv", "3.11.7"),
        "pep621": ({"pyproject.toml": '[project]\nname = "a"\nversion = "1"\ndependencies = ["flask"]\n'}, "pip", None),
        "pep517": ({"pyproject.toml": '[build-system]\nrequires = ["setuptools"]\n'}, "pip", None),
        "pyenv-comments": ({"requirements.txt": "", ".python-version": "# pinned\n\n3.11.7\n3.10\n",
                            "runtime.txt": "python-3.9"}, "pip", "3.11.7"),
    }
    for name, (files, manager, version) in cases.items():
        detection = detect(tree(tmp_path / name, files), LIMITS)
        assert (detection.stacks, detection.python_manager, detection.python_version) == \
            (("python",), manager, version), name
    assert "Detected Python (uv.lock, uv), Python 3.12 from .python-version" in detect(tmp_path / "uv", LIMITS).notes


def test_lockfile_beats_requirements_and_says_so(tmp_path):
    detection = detect(tree(tmp_path, {"requirements.txt": "", "uv.lock": "",
                                       "pyproject.toml": '[project]\nname = "a"\nversion = "1"\n'}), LIMITS)
    assert detection.python_manager == "uv"
    assert "Using uv.lock for Python dependencies; ignoring requirements.txt" in detection.notes  # uv reads pyproject


def test_pyproject_with_only_tool_settings_is_not_an_app(tmp_path):
    tree(tmp_path, {"pyproject.toml": "[tool.ruff]\nline-length = 120\n"})
    with pytest.raises(DetectError, match="Nothing to deploy"):
        detect(tmp_path, LIMITS)


def test_node_managers_and_engines(tmp_path):
    cases = {
        "npm": ({"package-lock.json": "{}"}, "npm"),
        "shrinkwrap": ({"npm-shrinkwrap.json": "{}"}, "npm"),
        "yarn": ({"yarn.lock": ""}, "yarn"),
        "pnpm": ({"pnpm-lock.yaml": ""}, "pnpm"),
        "none": ({}, "npm"),
    }
    for name, (files, manager) in cases.items():
        package = json.dumps({"name": name, "engines": {"node": "20.x"}})
        detection = detect(tree(tmp_path / name, {"package.json": package, **files}), LIMITS)
        assert (detection.stacks, detection.node_manager, detection.node_engine) == (("node",), manager, "20.x")
    notes = detect(tmp_path / "none", LIMITS).notes
    assert "Detected Node.js (package.json, npm, no lockfile), engines.node 20.x" in notes
    both = detect(tree(tmp_path / "both", {"package.json": "{}", "yarn.lock": "", "package-lock.json": "{}"}),
                  LIMITS)
    assert both.node_manager == "yarn"
    assert "Several lockfiles found; using yarn.lock, ignoring package-lock.json" in both.notes


def test_stacks_come_in_build_order(tmp_path):
    detection = detect(tree(tmp_path, {"requirements.txt": "", "package.json": "{}", "go.mod": "module x\n\ngo 1.22\n",
                                       ".static": "dist\n", "Dockerfile": "FROM scratch\n", "Procfile": "web: x\n"}),
                       LIMITS)
    assert detection.stacks == ("node", "python", "go", "static")
    assert detection.has_dockerfile
    assert "Detected Go (go.mod, module x, go 1.22)" in detection.notes
    assert detection.go_module == "x"


def test_index_html_is_a_static_site_only_without_a_language(tmp_path):
    assert detect(tree(tmp_path / "plain", {"index.html": "<p>hi</p>"}), LIMITS).stacks == ("static",)
    assert detect(tree(tmp_path / "python", {"index.html": "", "requirements.txt": ""}), LIMITS).stacks == ("python",)
    assert detect(tree(tmp_path / "marker", {".static": ""}), LIMITS).stacks == ("static",)


def test_procfile_alone_or_dockerfile_alone_is_deployable(tmp_path):
    assert detect(tree(tmp_path / "procfile", {"Procfile": "web: ./serve\n"}), LIMITS).procfile == {"web": "./serve"}
    dockerfile = detect(tree(tmp_path / "docker", {"Dockerfile": "FROM scratch\n"}), LIMITS)
    assert dockerfile.has_dockerfile and dockerfile.stacks == () and dockerfile.notes == []


def test_nothing_deployable_says_what_to_add(tmp_path):
    tree(tmp_path, {"README.md": "hello", "src/main.rs": "fn main() {}"})
    with pytest.raises(DetectError) as error:
        detect(tmp_path, LIMITS)
    message = str(error.value)
    assert "Add a Procfile with a 'web: <command>' line, a Dockerfile" in message
    assert "requirements.txt" in message and "package.json" in message


@pytest.mark.parametrize("files, message", [
    ({"Procfile": "web: a\nweb: b\n"}, "Procfile line 2: the 'web' process is already declared on line 1"),
    ({"Procfile": "web: a", "app.json": '{"formation": []}'}, "app.json: formation must be an object"),
    ({"package.json": "{not json"}, "package.json is not valid JSON"),
    ({"package.json": "[]"}, "package.json must hold a JSON object"),
    ({"package.json": '{"engines": {"node": 20}}'}, "engines.node must be a version range string"),
    ({"pyproject.toml": "[project\n"}, "pyproject.toml is not valid TOML"),
    ({"pyproject.toml": 'project = "x"\n'}, "pyproject.toml: project must be a table"),
    ({"pyproject.toml": '[project]\nname = "a"\ndependencies = "flask"\n'},
     "pyproject.toml: project.dynamic and project.dependencies must be arrays of strings"),
    ({"pyproject.toml": '[project]\nname = "a"\ndynamic = 3\n'}, "project.dynamic and project.dependencies must"),
    ({"requirements.txt": "", ".python-version": "pypy3.10\n"}, ".python-version: 'pypy3.10' is not a Python version"),
    ({"requirements.txt": "", "runtime.txt": "3.11\n"}, "runtime.txt: '3.11' is not a Python version; write one "
                                                        "like python-3.12"),
])
def test_malformed_app_files_fail_detection_with_their_message(tmp_path, files, message):
    tree(tmp_path, files)
    with pytest.raises(DetectError) as error:
        detect(tmp_path, LIMITS)
    assert message in str(error.value)


def test_non_utf8_procfile(tmp_path):
    (tmp_path / "Procfile").write_bytes(b"web: \xff\xfe\n")
    with pytest.raises(DetectError, match="Procfile is not UTF-8 text"):
        detect(tmp_path, LIMITS)


# JSONC, bounds and hostile files


def test_app_json_is_jsonc_like_dokkus():
    document = '''{
      // Dokku's own test apps comment their app.json
      "healthchecks": {"web": [{"path": "/health", /* inline */ "content": "ok // not a comment",},],},
      "scripts": {"dokku": {"predeploy": "echo 'a /* b */ c'"}},
    }'''
    app = parse_app_json(document, LIMITS)
    assert app.healthchecks["web"][0].content == "ok // not a comment"
    assert app.predeploy == "echo 'a /* b */ c'"


@pytest.mark.parametrize("document, message", [
    ('{\n  // fine\n  "env": {"A": "1"}\n  "formation": {}\n}', "not valid JSON: Expecting ',' delimiter at line 4 "
                                                              "column 3"),
    ('{"env": {} /* never closed', "the /* comment on line 1 is never closed"),
    ("[" * 100_000 + "]" * 100_000, "app.json nests deeper than 64 levels of arrays and objects"),
    ('{"a": ' + "[" * 65 + "]" * 65 + "}", "app.json nests deeper than 64 levels"),
    ('{"healthchecks": {"web": [{"timeout": NaN}]}}', "NaN is not a JSON number"),
    ('{"healthchecks": {"web": [{"timeout": 1e999}]}}', "1e999 is too large a number"),
    ('{"env": {"A": "x\\u0000y"}}', "a string holds a NUL character"),
    ('{"env": {"A": "\\udc80"}}', "unpaired surrogate"),
    ('{"formation": {"web": {"quantity": 33}}}', "app.json: formation.web.quantity is 33: the limit is 32 (an "
                                                 "admin can raise it with devflow up --max-replicas-per-type)"),
    ('{"formation": {' + ", ".join(f'"p{i}": {{"quantity": 20}}' for i in range(4)) + "}}",
     "app.json: formation asks for 80 processes in all: the limit is 64"),
    ('{"healthchecks": {' + ", ".join(f'"p{i}": []' for i in range(33)) + "}}",
     "app.json: healthchecks names 33 process types: the limit is 32 (an admin can raise it with devflow up "
     "--max-process-types)"),
])
def test_app_json_refusals_are_clear(document, message):
    with pytest.raises(AppJsonError) as error:
        parse_app_json(document, LIMITS)
    assert message in str(error.value)


def test_procfile_process_types_are_bounded():
    text = "".join(f"p{i}: run {i}\n" for i in range(40))
    with pytest.raises(ProcfileError) as error:
        parse_procfile(text, LIMITS)
    assert str(error.value) == ("Procfile declares 40 process types: the limit is 32 (an admin can raise it with "
                                "devflow up --max-process-types)")
    assert len(parse_procfile(text, Limits(max_process_types=40))) == 40
    with pytest.raises(ProcfileError, match="holds a NUL character"):
        parse_procfile("web: a\x00b\n", LIMITS)


@pytest.mark.parametrize("name, setting, size", [("Procfile", "max_procfile_bytes", "1 KiB"),
                                                 ("app.json", "max_app_json_bytes", "1 KiB"),
                                                 ("package.json", "max_parsed_manifest_bytes", "1 MiB"),
                                                 ("pyproject.toml", "max_parsed_manifest_bytes", "1 MiB"),
                                                 ("go.mod", "max_parsed_manifest_bytes", "1 MiB")])
def test_sizes_are_bounded_by_their_setting(tmp_path, name, setting, size):
    limit = 1024 if size == "1 KiB" else 1024**2
    content = {"Procfile": "web: x\n", "app.json": "{}", "package.json": "{}", "pyproject.toml": "[project]\n",
               "go.mod": "module x\n"}[name]
    (tmp_path / "index.html").write_text("")
    (tmp_path / name).write_text(content + " " * (limit - len(content)))
    detect(tmp_path, Limits(**{setting: limit}))  # right at the limit
    (tmp_path / name).write_text(content + " " * (limit - len(content) + 1))
    with pytest.raises(DetectError) as error:
        detect(tmp_path, Limits(**{setting: limit}))
    assert str(error.value) == (f"{name} is larger than {size} (an admin can raise the limit with devflow up "
                                f"--{setting.replace('_', '-')})")


def test_the_manifests_detection_parses_have_a_bound_of_their_own(tmp_path):
    """A 64 MiB package.json of short keys took a gigabyte to parse; the lockfiles' bound stays 64 MiB."""
    assert LIMITS.max_parsed_manifest_bytes == 1024**2 and LIMITS.max_manifest_bytes == 64 * 1024**2
    with open(tmp_path / "package.json", "wb") as package:
        package.write(b'{"dependencies":{"a":0')
        for start in range(0, 6_000_000, 100_000):
            package.write(b"".join(b',"%x":0' % n for n in range(start, start + 100_000)))
        package.write(b"}}")
    assert (tmp_path / "package.json").stat().st_size > 60 * 1024**2
    tracemalloc.start()
    try:
        with pytest.raises(DetectError) as error:
            detect(tmp_path, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value) == ("package.json is larger than 1 MiB (an admin can raise the limit with devflow up "
                                "--max-parsed-manifest-bytes)")
    assert peak < 1024**2, peak  # refused by its size, before a byte of it is read


def test_detection_keeps_what_the_build_needs_of_the_manifests_not_the_documents(tmp_path):
    package = {"name": "a", "scripts": {"build": "x", "start": "y"}, "dependencies": {"ms": "2"}}
    text = json.dumps(package)
    detection = detect(tree(tmp_path / "node", {"package.json": text}), LIMITS)
    assert detection.node_package is not None
    assert detection.node_package.digest == hashlib.sha256(text.encode()).hexdigest()
    assert json.loads(detection.node_package.manifest) == {"name": "a", "dependencies": {"ms": "2"}}
    assert detection.node_package.scripts == {"build", "start"} and not detection.node_package.reads_source
    local = detect(tree(tmp_path / "local", {"package.json": '{"dependencies": {"lib": "file:../lib"}}'}), LIMITS)
    assert local.node_package is not None and local.node_package.reads_source
    pep621 = '[project]\nname = "a"\nversion = "1"\ndependencies = ["flask>=3"]\n'
    assert detect(tree(tmp_path / "pep621", {"pyproject.toml": pep621}), LIMITS).python_dependencies == ("flask>=3",)
    dynamic = '[project]\nname = "a"\ndynamic = ["dependencies"]\n'
    assert detect(tree(tmp_path / "dynamic", {"pyproject.toml": dynamic}), LIMITS).python_dependencies is None
    pip = detect(tree(tmp_path / "pip", {"pyproject.toml": pep621, "requirements.txt": ""}), LIMITS)
    assert pip.python_dependencies is None  # pip installs requirements.txt


def test_an_in_tree_link_is_read_and_a_deeply_nested_pyproject_refused(tmp_path):
    tree(tmp_path, {"deploy/Procfile": "web: ./serve\n", "pyproject.toml": "a = " + "[" * 5000 + "]" * 5000})
    (tmp_path / "Procfile").symlink_to("deploy/Procfile")
    with pytest.raises(DetectError, match="^pyproject.toml nests arrays or tables too deeply$"):
        detect(tmp_path, LIMITS)
    (tmp_path / "pyproject.toml").unlink()
    assert detect(tmp_path, LIMITS).procfile == {"web": "./serve"}


DETECTED_FILES = ("Procfile", "app.json", "pyproject.toml", "package.json", ".python-version", "runtime.txt", "go.mod",
                  "package-lock.json", "requirements.txt", ".static")


@pytest.mark.parametrize("planted", ["fifo", "outside", "huge"])
@pytest.mark.parametrize("name", DETECTED_FILES)
def test_hostile_files_fail_detection_clearly_without_hanging(tmp_path, name, planted):
    """What an app's processes could plant, were detection to read a tree they can write."""
    src = tree(tmp_path / "app", {"requirements.txt": "", "package.json": "{}"} if name != "requirements.txt" else
               {"package.json": "{}"})
    (tmp_path / "secret").write_text("root only")
    target = src / name
    target.unlink(missing_ok=True)
    if planted == "fifo":
        os.mkfifo(target)
    elif planted == "outside":
        target.symlink_to(tmp_path / "secret")
    else:
        with open(target, "wb") as f:
            f.truncate(1024**3)
    expected = {"fifo": f"{name} is a FIFO, not a regular file",
                "outside": f"{name} is a symbolic link that leads outside the app",
                "huge": f"{name} is larger than "}[planted]
    if planted == "fifo" and name in ("package-lock.json", "requirements.txt", ".static"):
        detect(src, LIMITS)  # only looked for, not read: the builder refuses it if it gets that far
        return
    if planted == "huge" and name in ("package-lock.json", "requirements.txt", ".static"):
        detect(src, LIMITS)  # not read by detection
        return
    with pytest.raises(DetectError) as error:
        detect(src, LIMITS)
    assert str(error.value).startswith(expected)
    assert "root only" not in str(error.value)
