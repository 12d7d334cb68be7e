#!/usr/bin/env bash
# Installs everything the worker, the demo and the tests need on this machine.
# Safe to run again: it only does what is missing. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: redis-server (dedup store of the demo and tests), prometheus
# (promtool and the server the deploy tests run), postgresql (the inbox tests; Debian
# keeps its server binaries under /usr/lib/postgresql/<version>/bin).
# podman, runc and debootstrap build and run the container image (the image tier of the
# tests, skipped with its reason where they are missing and cannot be installed).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 \
  || missing+=(postgresql)
optional=()
for tool in podman runc debootstrap iptables; do
  command -v "$tool" >/dev/null 2>&1 || optional+=("$tool")
done
# ip and iptables: the partition scenarios run replicas in network namespaces
# (tests/test_partitions.py, skipped with its reason where they cannot run).
command -v ip >/dev/null 2>&1 || optional+=(iproute2)
if ! command -v apt-get >/dev/null 2>&1; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: ${missing[*]} missing and apt-get is not available; install them" >&2
    exit 1
  fi
  [ ${#optional[@]} -eq 0 ] \
    || echo "setup: ${optional[*]} missing: the container image tests will be skipped" >&2
else
  missing+=("${optional[@]}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]} with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python 3.11 or newer is needed (found $("$python" --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

# Reinstall only when pyproject.toml changed since the last install.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The Compose specification's JSON schema, for validating docker-compose.yml offline. It
# ships inside the docker-compose 1.x wheel (the schema, not the old tool, is used).
schema=.venv/share/compose-spec.json
if [ ! -f "$schema" ]; then
  echo "setup: fetching the Compose specification schema"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" \
    docker-compose==1.29.2 2>/dev/null
  mkdir -p .venv/share
  .venv/bin/python -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("compose/config/compose_spec.json"))' \
    "$tmp"/docker_compose-1.29.2-*.whl > "$schema"
  rm -rf "$tmp"
fi
