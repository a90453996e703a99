# Sourced by scripts/test under CI=true: the system tools the integration tests drive.
# Each entry is "how to tell it is there|the Debian package that provides it".
CI_TOOLS=(
  "command -v git|git"
  "command -v ssh|openssh-client"
  "command -v ssh-keygen|openssh-client"
  "command -v node|nodejs"
  "command -v npm|npm"
  "/usr/bin/python3 -c 'import ensurepip'|python3-venv"
  "command -v go|golang-go"
)
# The other package managers the native builder drives, for the fixture apps that use them. Builds run as
# the app's user, so they go where every user can run them: a venv of the system Python (not one under
# /root) and npm's global prefix. Both outlive the run, so later runs on this machine skip the download.
CI_TOOLS_VENV=${DEVFLOW_CI_TOOLS_VENV:-/opt/devflow-ci-tools}
CI_PYTHON_TOOLS=("uv>=0.5,<1" "poetry>=2,<3" "pipenv>=2024.0")
CI_NODE_TOOLS=("yarn@1" "pnpm@>=9 <13")  # lockfile v9, as the fixture's

install_ci_packages() {
  local missing=() entry
  for entry in "${CI_TOOLS[@]}"; do
    bash -c "${entry%%|*}" >/dev/null 2>&1 || missing+=("${entry##*|}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "CI: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  install_build_tools
}

install_build_tools() {
  local tool missing=()
  for tool in uv poetry pipenv; do  # root finding one (in /root/.local, say) is not an app user finding it
    [ -x "$CI_TOOLS_VENV/bin/$tool" ] || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "CI: installing ${CI_PYTHON_TOOLS[*]} into $CI_TOOLS_VENV" >&2
    (
      umask 022  # readable by every app user, whatever root's umask
      [ -x "$CI_TOOLS_VENV/bin/pip" ] || /usr/bin/python3 -m venv "$CI_TOOLS_VENV"
      "$CI_TOOLS_VENV/bin/pip" install -q --disable-pip-version-check "${CI_PYTHON_TOOLS[@]}" >&2
    )
  fi
  for tool in uv poetry pipenv; do
    [ "$(readlink "/usr/local/bin/$tool")" = "$CI_TOOLS_VENV/bin/$tool" ] || ln -sf "$CI_TOOLS_VENV/bin/$tool" /usr/local/bin/
  done
  local global
  global=$(npm prefix -g 2>/dev/null)/bin
  if [ ! -x "$global/yarn" ] || [ ! -x "$global/pnpm" ]; then
    echo "CI: installing ${CI_NODE_TOOLS[*]} with npm" >&2
    (umask 022 && npm install -g --no-fund --no-audit "${CI_NODE_TOOLS[@]}" >&2)
  fi
}
