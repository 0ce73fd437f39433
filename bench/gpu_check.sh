#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests and the inference tests on the GPU, the throughput bench, and
# perf_analyzer with IMAGE input. Results under $OUT (default bench/results/gpu-check).
# A machine without a registry gets the packages its Python lacks as wheels in build/whl, made
# where pip works (for the machine's Python, e.g. 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_38_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d build/whl grpcio==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 \
#     protobuf==6.33.6 tritonclient==2.73.0 python-rapidjson prometheus-client==0.26.0 perf-analyzer==2.60.0 \
#     cryptography==50.0.2 cffi==2.0.0 pycparser
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
if [ -d build/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site build/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/clients/python PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, torchvision, grpc, google.protobuf as p; print('torch', torch.__version__, 'tv', torchvision.__version__, 'grpc', grpc.__version__, 'pb', p.__version__, 'cuda', torch.cuda.is_available())"
echo "== tests"
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  "tests/test_triton_api.py::test_on_cuda_unload_gives_the_memory_back_and_statistics_split_the_phases" \
  tests/test_inference.py > $OUT/pytest.log 2>&1
echo "pytest rc=$?"; tail -n 40 $OUT/pytest.log
echo "== bench"
timeout 270 python3 -m bench.throughput --device cuda --models alexnet,resnet101 --modes image,pixels,pixels-shm \
  --concurrency 1,32 --runtimes auto --seconds 4 --warmup-seconds 1 --output $OUT/bench_cuda.json > $OUT/bench.log 2>&1
echo "bench rc=$?"; tail -n 30 $OUT/bench.log
echo "== perf_analyzer"
PA=$(command -v perf_analyzer || echo /tmp/site/perf_analyzer/bin/perf_analyzer); chmod +x "$PA" 2>/dev/null
python3 -m service --host 127.0.0.1 --grpc-port 8001 --metrics-port 8002 --models alexnet --weights random \
  --device cuda --model-store /tmp/store > $OUT/server.log 2>&1 &
S=$!
python3 - <<'PY'
import base64, io, json, time, grpc, numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
b = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(b, "JPEG")
import struct
raw = struct.pack("<I", len(b.getvalue())) + b.getvalue()  # raw BYTES: length prefix, then the bytes
json.dump({"data": [{"IMAGE": {"b64": base64.b64encode(raw).decode(), "shape": [1]}}]}, open("/tmp/image.json", "w"))
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel("127.0.0.1:8001"))
for _ in range(120):
    try:
        if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == 1: print("SERVING"); break
    except grpc.RpcError: pass
    time.sleep(0.5)
PY
timeout 60 $PA -m alexnet -u 127.0.0.1:8001 -i grpc --input-data /tmp/image.json --concurrency-range 1:16:15 \
  --measurement-interval 3000 --max-trials 4 --stability-percentage 30 > $OUT/pa.log 2>&1
echo "pa rc=$?"; tail -n 15 $OUT/pa.log
kill $S; wait $S; tail -n 3 $OUT/server.log
