#!/usr/bin/env bash
# mailguard developer entry point.
#   ./dev.sh run    set up (Debian packages, virtualenv) and run the gate on config/mailguard.toml
#                   with its embedded Redis in ./state
#   ./dev.sh test   set up and run the whole test suite (lint, types, pytest)
#   ./dev.sh setup  only set up
# Needs Debian 12 (or similar) with Python >= 3.11; installs what it needs with apt-get as root
# (or through sudo).
set -euo pipefail
cd "$(dirname "$0")"

DEB_PACKAGES=(python3-venv python3-dev gcc redis-server openssl libmilter-dev miltertest postfix)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

need_packages() {
    local missing=()
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # python3-venv is only needed when this python cannot make a venv with pip by itself.
    if "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        missing=("${missing[@]/python3-venv}")
    fi
    printf '%s\n' "${missing[@]}" | grep -v '^$' || true
}

setup() {
    if ! command -v dpkg-query >/dev/null; then
        echo "dev.sh: not a Debian system; install: ${DEB_PACKAGES[*]}" >&2
    else
        mapfile -t missing < <(need_packages)
        if [ "${#missing[@]}" -gt 0 ]; then
            local sudo=""
            [ "$(id -u)" -eq 0 ] || sudo="sudo"
            echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
            # Postfix is for the tests' private instances only: leave the system one unconfigured.
            echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        fi
    fi
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed"'
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
}

case "${1:-}" in
    setup)
        setup
        ;;
    run)
        setup
        shift
        mkdir -p state
        export MAILGUARD_STATE_DIR="${MAILGUARD_STATE_DIR:-$PWD/state}"
        exec "$VENV/bin/mailguard" serve --config "${MAILGUARD_CONFIG:-config/mailguard.toml}" "$@"
        ;;
    test)
        setup
        shift
        "$VENV/bin/ruff" check mailguard tests loadtest
        "$VENV/bin/mypy" mailguard
        exec "$VENV/bin/pytest" -q "$@"
        ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
