#!/usr/bin/env bash
# Here, on a machine with PyPI: the payload the GPU machine needs and cannot download (it has no registry).
#
#   scripts/gpu/prepare.sh            # writes .gpu-kit/ (ignored by git): parts/part-NN, SHA256SUMS, PARTS
#   scripts/gpu/prepare.sh --dry-run  # says what it would download and how it would split, downloads nothing
#
# The payload is one tar: the onnxruntime-gpu wheel for the GPU machine's Python (3.12, manylinux x86_64) and the
# few wheels neodeploy needs there that its image may lack (installed there only when missing). One remote call
# carries at most 64 MiB (the working tree included), so the tar travels in parts of at most 55 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."

ORT_GPU="onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"
PYTHON_VERSION="${GPU_PYTHON_VERSION:-3.12}"
PART_MIB=55
KIT=.gpu-kit
# Pure-Python or abi3 wheels the export, the runtime and the server import; the GPU image ships torch, onnx,
# numpy and transformers, and these only if someone put them there.
DEPS=(onnxscript onnx-ir onnxslim tokenizers fastapi starlette uvicorn pydantic pydantic-core annotated-types
      typing-inspection prometheus-client jinja2 markupsafe llguidance httpx httpcore h11 anyio idna certifi)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
DOWNLOAD=(python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION"
          --implementation cp "${PLATFORMS[@]}" --isolated --index-url https://pypi.org/simple)

if [[ "${1:-}" == "--dry-run" ]]; then
    echo "would run: ${DOWNLOAD[*]} -d $KIT/payload '$ORT_GPU'"
    echo "would run: ${DOWNLOAD[*]} -d $KIT/payload/deps ${DEPS[*]}"
    echo "would write: $KIT/payload.tar split into $KIT/parts/part-NN of at most $PART_MIB MiB, $KIT/SHA256SUMS, $KIT/PARTS"
    exit 0
fi

rm -rf "$KIT" && mkdir -p "$KIT/payload/deps" "$KIT/parts"
"${DOWNLOAD[@]}" -d "$KIT/payload" "$ORT_GPU"
"${DOWNLOAD[@]}" -d "$KIT/payload/deps" "${DEPS[@]}"
wheel=$(ls "$KIT"/payload/onnxruntime_gpu-*.whl)
case "$wheel" in
    *-cp${PYTHON_VERSION/./}-*manylinux*x86_64*.whl) ;;
    *) echo "unexpected wheel $wheel: not a cp${PYTHON_VERSION/./} manylinux x86_64 build" >&2; exit 1 ;;
esac
tar -C "$KIT/payload" -cf "$KIT/payload.tar" .
split -b "${PART_MIB}M" -d -a 2 "$KIT/payload.tar" "$KIT/parts/part-"
(cd "$KIT" && sha256sum payload.tar parts/part-* > SHA256SUMS)
ls "$KIT/parts" | wc -l | tr -d ' ' > "$KIT/PARTS"
rm "$KIT/payload.tar"  # the parts are the payload now; the GPU machine rebuilds the tar from them
echo "wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
echo "parts: $(cat "$KIT/PARTS") in $KIT/parts (max $PART_MIB MiB each); checksums in $KIT/SHA256SUMS"
