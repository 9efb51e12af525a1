#!/usr/bin/env bash
# On the GPU machine, one call per part (the run carries .gpu-kit/parts/part-NN and .gpu-kit/SHA256SUMS):
#
#   bash scripts/gpu/receive.sh NN
#
# checks part NN against SHA256SUMS and stashes it outside the working tree (it survives the next call while the
# machine stays warm). The call that completes the set rebuilds the tar, checks its sha256, installs the
# onnxruntime-gpu wheel with pip --no-deps --target into the stash (ahead of the image's CPU onnxruntime once
# env.sh puts it first on PYTHONPATH), installs the neodeploy dependencies the image lacks, and checks that
# onnxruntime then offers CUDAExecutionProvider. DRY_RUN=1 stops after the checksums and the unpacking and says what
# it would install (this machine's Python is not 3.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
part="part-$(printf '%02d' "$((10#${1:?usage: receive.sh PART_NUMBER}))")"
KIT=.gpu-kit
STASH="${NEODEPLOY_GPU_STASH:-/tmp/neodeploy-gpu-kit}"
mkdir -p "$STASH/parts"
cp "$KIT/SHA256SUMS" "$STASH/SHA256SUMS"
(cd "$KIT" && grep " parts/$part\$" SHA256SUMS | sha256sum --check --quiet) || { echo "$part: sha256 mismatch or not listed; send it again" >&2; exit 1; }
cp "$KIT/parts/$part" "$STASH/parts/$part"
have=$(ls "$STASH/parts" | wc -l); want=$(grep -c ' parts/' "$STASH/SHA256SUMS")
echo "$part ok ($have of $want parts here)"
[[ "$have" -lt "$want" ]] && exit 0

cat "$STASH"/parts/part-* > "$STASH/payload.tar"
(cd "$STASH" && grep ' payload.tar$' SHA256SUMS | sha256sum --check --quiet) || { echo "payload.tar: sha256 mismatch; resend the parts" >&2; exit 1; }
rm -rf "$STASH/payload" "$STASH/site" "$STASH/deps" && mkdir -p "$STASH/payload" "$STASH/deps"
tar -C "$STASH/payload" -xf "$STASH/payload.tar" && rm "$STASH/payload.tar" "$STASH"/parts/part-*
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "dry run: payload.tar checked and unpacked; would install: $(cd "$STASH/payload" && ls *.whl) and, where missing, $(ls "$STASH/payload/deps" | wc -l) wheels from deps/"
    exit 0
fi
python3 -m pip install --quiet --no-deps --no-index --target "$STASH/site" "$STASH"/payload/onnxruntime_gpu-*.whl
# Only what the image lacks: a second copy of a package it has could shadow the version its other packages expect.
for wheel in "$STASH"/payload/deps/*.whl; do
    dist=$(basename "$wheel" | cut -d- -f1)
    module=$(echo "$dist" | tr 'A-Z' 'a-z')
    python3 -c "import $module" 2>/dev/null || python3 -m pip install --quiet --no-deps --no-index --target "$STASH/deps" "$wheel"
done
source scripts/gpu/env.sh
python3 - <<'PY'
import onnxruntime as ort
print("onnxruntime", ort.__version__, "from", ort.__file__)
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
print("providers:", ", ".join(ort.get_available_providers()))
assert "CUDAExecutionProvider" in ort.get_available_providers(), "the GPU build is not the one imported"
PY
