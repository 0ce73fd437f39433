#!/usr/bin/env bash
# On a CUDA machine: the model API tests (ModelConfig lists the GPU, statistics split the
# phases, unloading gives the device memory back), then perf_analyzer against vision-serve
# with IMAGE and PIXELS input data. Results under $OUT (default: bench/results/gpu-check).
#
# Needs torch with CUDA, the project's dependencies, tritonclient and perf_analyzer. On a machine
# without a registry, carry wheels in build/whl (made where pip works, for the machine's python):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_38_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d build/whl perf-analyzer==2.60.0 tritonclient==2.73.0 python-rapidjson==1.25 \
#     grpcio==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 protobuf==6.33.6
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
if [ -d build/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site build/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD:$PWD/clients/python
  PA=/tmp/site/perf_analyzer/bin/perf_analyzer
  chmod +x "$PA"
else
  export PYTHONPATH=$PWD:$PWD/clients/python
  PA=$(command -v perf_analyzer)
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, grpc, google.protobuf as p; print('torch', torch.__version__, 'grpc', grpc.__version__, 'protobuf', p.__version__, 'cuda', torch.cuda.is_available())"
timeout 280 python3 -m pytest tests/test_triton_api.py tests/test_proto_compat.py -q -x -p no:cacheprovider \
  -k "not stubs_are_generated" > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -n 15 "$OUT/pytest.log"
python3 -m service --host 127.0.0.1 --grpc-port 8001 --metrics-port 8002 --models alexnet --weights random \
  --device cuda --max-batch-size 32 --max-queue-delay-ms 2 > "$OUT/server.log" 2>&1 &
SERVER=$!
python3 - <<'PY'
import base64, io, json, time
import grpc, numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
buffer = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buffer, "JPEG")
json.dump({"data": [{"IMAGE": {"b64": base64.b64encode(buffer.getvalue()).decode()}}]}, open("/tmp/image.json", "w"))
pixels = np.random.default_rng(0).standard_normal(3 * 224 * 224).astype("float32")
json.dump({"data": [{"PIXELS": {"content": pixels.tolist(), "shape": [3, 224, 224]}}]}, open("/tmp/pixels.json", "w"))
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel("127.0.0.1:8001"))
for _ in range(240):
    try:
        if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == 1:
            print("server SERVING")
            break
    except grpc.RpcError:
        pass
    time.sleep(0.5)
PY
COMMON="-m alexnet -u 127.0.0.1:8001 -i grpc --measurement-interval 3000 --max-trials 4 --stability-percentage 25"
timeout 120 "$PA" $COMMON --input-data /tmp/image.json --concurrency-range 1:16:5 -f "$OUT/pa_image.csv" \
  > "$OUT/pa_image.log" 2>&1
echo "perf_analyzer IMAGE rc=$?"; tail -n 12 "$OUT/pa_image.log"
timeout 120 "$PA" $COMMON --input-data /tmp/pixels.json -b 8 --concurrency-range 1:4:3 -f "$OUT/pa_pixels.csv" \
  > "$OUT/pa_pixels.log" 2>&1
echo "perf_analyzer PIXELS rc=$?"; tail -n 10 "$OUT/pa_pixels.log"
kill "$SERVER"; wait "$SERVER"; tail -n 3 "$OUT/server.log"
