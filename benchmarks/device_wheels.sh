# Sourced by the scripts that run on the lent GPU machine (Python 3.12, CUDA torch, no package registry):
# the wheels it lacks, fetched here at this venv's versions, and installed there into a venv over the
# machine's own packages.
DEVICE_WHEELS=(faiss-cpu grpcio grpcio-health-checking grpcio-reflection protobuf cryptography cffi)
DEVICE_PYTHON_VERSION=${DEVICE_PYTHON:-3.12}  # the GPU machine's python3

# fetch_device_wheels DIR: downloads the wheels for the GPU machine's Python into DIR (emptied first).
fetch_device_wheels() {
    local dir=$1 python=${PYTHON:-.venv/bin/python} pinned=() name
    for name in "${DEVICE_WHEELS[@]}"; do
        pinned+=("$name==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    rm -rf "$dir" && mkdir -p "$dir"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON_VERSION" \
        --implementation cp --abi "cp${DEVICE_PYTHON_VERSION/./}" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform any -d "$dir" "${pinned[@]}"
}

# install_device_wheels DIR VENV: a venv at VENV over the machine's packages, with DIR's wheels in it.
install_device_wheels() {
    local dir=$1 venv=$2
    [ -d "$dir" ] || { echo "no $dir: fetch the wheels where there is a registry (--fetch), and carry them" >&2; exit 1; }
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet --no-index --no-deps --find-links "$dir" "${DEVICE_WHEELS[@]}"
}
