#!/bin/bash
# Install what blocksnap needs on a Debian machine (run as root): Debian packages
# from .ci/apt-packages*.txt, then a virtualenv in .venv with the package and its
# Python dependencies. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

pkgs=$(for f in .ci/apt-packages*.txt; do sed 's/#.*//' "$f"; echo; done | xargs -n1 | sort -u | xargs)
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing >/dev/null
fi
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
# An editable install leaves blocksnap's own modules uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set (CI images, some containers) every command would
# compile them again at start (0.1-0.3 s): compile them once here.
.venv/bin/python -m compileall -q -j0 src >/dev/null
echo "setup: ready ($(.venv/bin/python -c 'import blocksnap; print("blocksnap", blocksnap.__version__)'))"
