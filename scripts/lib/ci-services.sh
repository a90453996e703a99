# Sourced by scripts/test under CI=true: the system tools the integration tests drive.
# Each entry is "how to tell it is there|the Debian package that provides it".
CI_TOOLS=(
  "command -v git|git"
  "command -v ssh|openssh-client"
  "command -v ssh-keygen|openssh-client"
  "command -v node|nodejs"
  "command -v npm|npm"
  "/usr/bin/python3 -c 'import ensurepip'|python3-venv"
)

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
}
