#!/usr/bin/env bash
# The one call a lent GPU machine gets (docs/gpu.md): installs the wheels that
# experiments/device_prepare.sh put in .whl/, then runs experiments/device_suite.py, which says
# on its first line what is missing, if anything. Arguments go to device_suite.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The dry run uses this machine's own packages; the wheels are for the GPU machine's Python.
if [[ " $* " != *" --dry-run "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/device_suite_site .whl/*.whl >/tmp/device_suite_pip.log 2>&1 ||
    { echo "device suite: missing the carried wheels (pip could not install .whl/*.whl:" \
           "$(tail -1 /tmp/device_suite_pip.log)). Stopping."; exit 2; }
  export PYTHONPATH=/tmp/device_suite_site${PYTHONPATH:+:$PYTHONPATH}
  # An image whose protobuf is too old for the carried generated code: take the carried one.
  if ! "$PY" -c "import tensorflow_datasets" >/dev/null 2>&1 && compgen -G ".whl/fallback/*.whl" >/dev/null &&
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/device_suite_site .whl/fallback/*.whl >>/tmp/device_suite_pip.log 2>&1; then
    export DEVICE_SUITE_NOTE="took the carried $(cd .whl/fallback && ls *.whl | cut -d- -f1,2)"
  fi
fi
exec "$PY" experiments/device_suite.py "$@"
