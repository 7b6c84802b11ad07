#!/usr/bin/env bash
# The device check in one command, from the repository root of a checkout on the GPU machine:
#
#     bash bench/gpu_device.sh          # at most 6 minutes; results under $OUT (default runs/device-out)
#
# It needs the git-ignored folders docs/gpu.md says how to prepare: .whl/ (wheels of what the machine
# lacks, installed offline without their dependencies) and bench/gpu-photos/ (a few hundred COCO photos
# with their captions.json). Scratch files (20,000 JPEGs, caches) go to /tmp, not to $OUT.
set -euo pipefail
OUT="${OUT:-runs/device-out}"
WORK="${WORK:-/tmp/capcache-device-check}"
PY="${PYTHON:-python3}"  # the machine's python3 holds its PyTorch
mkdir -p "$OUT"
export CAPCACHE_TOKEN_CACHE="${CAPCACHE_TOKEN_CACHE:-$WORK/tokens}"  # the train part fills it, the sweep reads it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then  # into a folder of their own: the machine's site-packages may be read-only
  "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --quiet --target "$WORK/site" \
    .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip could not install .whl/ (see pip.log): the parts that need it will fail"
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if [ -d .whl/site ]; then  # files carried as a folder (pycocoevalcap's pure-Python scorers)
  export PYTHONPATH="$PYTHONPATH:$PWD/.whl/site"
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import importlib, os, platform, shutil, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
shm = shutil.disk_usage("/dev/shm").free / 2**30 if os.path.isdir("/dev/shm") else 0.0
from common.device import usable_cores
print(f"cores {os.cpu_count()}, usable {usable_cores()} (affinity and cgroup quota), /dev/shm {shm:.1f} GB free "
      "(stage 1's workers prefetch into it)")
for m in ("torchvision", "nltk", "regex", "pycocoevalcap.cider.cider", "h5py", "click", "tqdm", "joblib", "PIL"):
    try:
        importlib.import_module(m)
        print("ok     ", m)
    except Exception as e:
        print("MISSING", m, type(e).__name__, e)
PY
# the parts' limits (bench/gpu.py LIMITS) add up to 310 s; the outer limit leaves it a margin, and kills (-k)
# what ignores its TERM: a part's own limit cannot fire while a CUDA call blocks
set +e
timeout -k 15 325 "$PY" bench/gpu.py --device cuda --work "$WORK" --results "$OUT" "$@" 2>"$OUT/stderr.log" \
  | tee "$OUT/stdout.log"
rc=$?
set -e
# the targets table for bench/RESULTS.md, also when a part failed (gpu.json says which)
if [ -f "$OUT/gpu.json" ]; then
  "$PY" bench/gpu_report.py "$OUT/gpu.json" | tee "$OUT/report.md" || true
fi
exit $rc
