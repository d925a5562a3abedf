# Sourced by the scripts that run on the lent GPU machine (Python 3.12, CUDA torch, no package registry):
# the wheels it lacks, fetched here at this venv's versions, and installed there into a folder that goes
# first on PYTHONPATH, over the machine's own packages. (Not a venv: the machine's python3 is itself a
# venv's, and a venv made from it sees only the base interpreter's packages, not torch or numpy.)
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

# install_device_wheels DIR SITE: DIR's wheels installed into the folder SITE (put it first on PYTHONPATH,
# with the checkout and its proto/ package, as `device_pythonpath SITE` prints).
install_device_wheels() {
    local dir=$1 site=$2
    [ -d "$dir" ] || { echo "no $dir: fetch the wheels where there is a registry (--fetch), and carry them" >&2; exit 1; }
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$dir"/*.whl
}

# device_pythonpath SITE: the PYTHONPATH of a run from this checkout, not installed: the wheels, the
# checkout, and the generated gRPC package under proto/ (the install maps it; a plain checkout does not).
device_pythonpath() {
    echo "$1:$PWD:$PWD/proto${PYTHONPATH:+:$PYTHONPATH}"
}
