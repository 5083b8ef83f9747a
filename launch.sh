#!/usr/bin/env bash
# One entry point. Sets up whatever is missing (idempotent; a no-op when nothing changed), then:
#   ./launch.sh [hydra overrides]     train -> evaluate -> export the recipe (default: the CPU demo)
#   ./launch.sh --help | --cfg job | --dry-run | -m a=1,2 ... | rerun runs/<run>   (docs/recipes.md)
#   ./launch.sh <command> [args]      validate, evaluate, export, predict, ... (the table: finetune/cli/commands.py)
#   ./launch.sh test [pytest args]    run the test suite
#   ./launch.sh setup                 only set up
# Environment: FINETUNE_VENV (default ./.venv), PYTHON (default python3), FINETUNE_CACHE_DIR (tiny models,
# default ~/.cache/finetune); multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE.
# Many tasks may start it at once on one venv (srun): the set-up is locked ($FINETUNE_VENV.lock), the others wait.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${FINETUNE_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
STAMP="$VENV/.finetune-setup"
SETUP_VERSION=1  # bump when the install steps below change

log() { printf '[launch.sh] %s\n' "$*" >&2; }

setup_key() {
  { echo "$SETUP_VERSION"; cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt"; } | sha256sum | cut -c1-16
}

ensure_venv() {
  [ -x "$VENV/bin/python" ] && return 0
  if ! "$PYTHON_BIN" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 13) else 1)' 2>/dev/null; then
    log "need Python 3.10-3.12 as \$PYTHON (tried '$PYTHON_BIN')"; exit 1
  fi
  log "creating the virtual environment $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
}

pip_install() {
  # pip's own chatter goes to a log; on failure its tail is shown. Bytecode is compiled afterwards, on every core
  # (compile_bytecode): pip compiles one file at a time, a third of the set-up time here.
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-compile -c "$ROOT/constraints.txt" "$@" \
      >>"$VENV/setup.log" 2>&1; then
    log "pip install $* failed; the end of $VENV/setup.log:"
    tail -n 40 "$VENV/setup.log" >&2
    exit 1
  fi
}

compile_bytecode() {
  # What pip would have written, so that a venv shared read-only (a cluster's) imports as fast as a private one;
  # files that are not Python 3 (templates, test fixtures) fail to compile in pip too and are skipped.
  "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" "$VENV/extras" >>"$VENV/setup.log" 2>&1 || true
}

install_packages() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(setup_key)" ] && return 0
  log "installing the pinned packages (constraints.txt) into $VENV; the first time takes a few minutes (log: $VENV/setup.log)"
  pip_install --upgrade pip setuptools wheel
  # torch first and alone: the CUDA build from PyPI (it runs on CPU-only machines). The +cpu wheel some
  # machines offer breaks torchvision and torchcodec, which are CUDA builds.
  pip_install torch torchvision torchcodec
  pip_install -e "$ROOT[test]"
  # deepspeed is an sdist that builds against the installed torch: no build isolation (which would pull a
  # second multi-GB torch into a temporary build environment).
  pip_install --no-build-isolation deepspeed
  # bitsandbytes (QLoRA) beside the venv, not in it: peft imports it in every process whenever it can (~2 s each).
  # The QLoRA tests put this folder on their path (tests/integration/test_qlora.py); a QLoRA user installs it into
  # the venv (pip install -e '.[qlora]').
  pip_install --no-deps --target "$VENV/extras/qlora" --upgrade bitsandbytes
  compile_bytecode
  "$VENV/bin/python" - <<'PY'
import sys, torch, torchvision
if "+cpu" in torch.__version__:
    sys.exit(f"torch {torch.__version__} is a +cpu build, which breaks torchvision; reinstall torch from PyPI "
             "(pip install --force-reinstall -c constraints.txt torch) and run ./launch.sh setup again.")
torchvision.ops.nms  # fails with "operator torchvision::nms does not exist" on a mismatched torch
PY
  setup_key > "$STAMP"
  log "packages ready"
}

ensure_ffmpeg() {
  # torchcodec needs FFmpeg's shared libraries from the system; PyAV ships its own and is the fallback.
  ldconfig -p 2>/dev/null | grep -q 'libavutil\.so' && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing the system FFmpeg libraries for torchcodec (apt-get install ffmpeg)"
    if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; then
      return 0
    fi
    log "apt-get could not install ffmpeg"
  fi
  if [ ! -f "$VENV/.ffmpeg-notice" ]; then
    log "no system FFmpeg libraries: videos will be decoded with PyAV instead of torchcodec (same frames, slower)"
    touch "$VENV/.ffmpeg-notice"
  fi
}

setup_done() {
  [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(setup_key)" ] \
    && { ldconfig -p 2>/dev/null | grep -q 'libavutil\.so' || [ -f "$VENV/.ffmpeg-notice" ]; }
}

with_setup_lock() {
  # Every task of `srun ./launch.sh ...` starts this at once, on several nodes, on one shared venv: one sets up while
  # the others wait, then find the work done (each step re-checks its stamp). flock (util-linux, essential on
  # Debian) where it exists, else mkdir, which is atomic on local and network file systems alike.
  local lock="$VENV.lock"
  mkdir -p "$(dirname "$VENV")"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$lock"
    flock -n 9 || { log "another task is setting up $VENV; waiting for it (lock: $lock)"; flock 9; }
    "$@"
    flock -u 9
    exec 9>&-
  else
    if ! mkdir "$lock.d" 2>/dev/null; then
      log "another task is setting up $VENV; waiting for it (lock: $lock.d, held by $(cat "$lock.d/owner" 2>/dev/null); remove it if that task is gone)"
      until mkdir "$lock.d" 2>/dev/null; do sleep 1; done
    fi
    echo "$(hostname) $$" >"$lock.d/owner"
    trap 'rm -rf "$lock.d"' EXIT
    "$@"
    rm -rf "$lock.d"
    trap - EXIT
  fi
}

setup_steps() {
  ensure_venv
  install_packages
  ensure_ffmpeg
}

setup() {
  setup_done && return 0  # the usual case: nothing to do, no lock to take
  with_setup_lock setup_steps
}

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# No `cd` for training: relative paths in overrides are the user's, from where they run the command.
case "${1:-}" in
  setup)
    setup ;;
  test)
    shift
    setup
    cd "$ROOT"
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    setup
    exec "$VENV/bin/python" -m finetune "$@" ;;
esac
