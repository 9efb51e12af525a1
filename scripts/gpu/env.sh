# Sourced on the GPU machine (by receive.sh and measure.sh): the stashed onnxruntime-gpu first on PYTHONPATH, ahead of
# the image's CPU onnxruntime; this checkout importable as `neodeploy`; the dependencies the image lacked last.
STASH="${NEODEPLOY_GPU_STASH:-/tmp/neodeploy-gpu-kit}"
mkdir -p "$STASH/src"
ln -sfn "$(pwd)" "$STASH/src/neodeploy"
export PYTHONPATH="$STASH/site:$STASH/src:$STASH/deps${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0
