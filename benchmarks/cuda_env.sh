# Sourced by the CUDA check scripts, from the repository root, on a bare GPU machine: where a folder .whl
# holds this project's pinned wheels (transformers, tokenizers, huggingface_hub, peft, adapters, ...), they
# are installed into /tmp/site first; peftlab is imported from src/. Sets PY.
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
