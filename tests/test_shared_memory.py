"""Triton's system shared memory with the real client library (``tritonclient.utils.shared_memory``)
and the real gRPC and HTTP clients, against one in-process server; and the owner of the regions
(``service.inference.shared_memory``) on its own.

Every test leaves no region registered and checks that the server stayed live and healthy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from service.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    PermissionDeniedError,
    RegionNotFoundError,
    SharedMemoryFullError,
)
from service.inference.shared_memory import SHM_DIRECTORY, SharedMemoryRegions, SharedTensor, shm_file_name
from service.transport.call import Call
from tests.client_util import inprocess_server
from tests.inprocess import InProcessServer
from vision_client.protocol.stubs.inference import grpc_service_pb2 as pb

MODEL = "alexnet"
SIDE = 224
IMAGE_BYTES = 3 * SIDE * SIDE * 4  # one PIXELS image, float32
LOGITS_BYTES = 1000 * 4  # one image's LOGITS
MAX_REGIONS = 4
MAX_BYTES = 8 * IMAGE_BYTES


def key(name: str) -> str:
    """A key of this test process only: /dev/shm is shared with whatever else runs on the host."""
    return f"/vs-test-{os.getpid()}-{name}"


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory, weights_dir: Path) -> Iterator[InProcessServer]:
    with inprocess_server(
        tmp_path_factory.mktemp("shm"),
        weights_dir,
        max_shared_memory_regions=MAX_REGIONS,
        max_shared_memory_bytes=MAX_BYTES,
    ) as server:
        yield server


@pytest.fixture
def client(shm_server: InProcessServer) -> Iterator[triton.InferenceServerClient]:
    """A gRPC client; after the test: no region left registered, and the server live and healthy."""
    with triton.InferenceServerClient(shm_server.target) as grpc_client:
        yield grpc_client
        grpc_client.unregister_system_shared_memory()
        assert grpc_client.get_system_shared_memory_status(as_json=True) == {}
        assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    with grpc.insecure_channel(shm_server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def regions() -> Iterator[dict[str, shm.SharedMemoryRegion]]:
    """Regions the test creates (name -> handle), destroyed after it."""
    made: dict[str, shm.SharedMemoryRegion] = {}
    yield made
    for handle in made.values():
        shm.destroy_shared_memory_region(handle)


def create(made: dict[str, shm.SharedMemoryRegion], name: str, byte_size: int) -> shm.SharedMemoryRegion:
    made[name] = shm.create_shared_memory_region(name, key(name), byte_size)
    return made[name]


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIDE, SIDE), dtype=np.float32)


def in_message(client: triton.InferenceServerClient, values: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    return client.infer(MODEL, [tensor]).as_numpy("LOGITS")


def shm_input(region: str, values: np.ndarray, offset: int = 0) -> triton.InferInput:
    tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_shared_memory(region, values.nbytes, offset)
    return tensor


def shm_output(region: str, byte_size: int, offset: int = 0) -> triton.InferRequestedOutput:
    output = triton.InferRequestedOutput("LOGITS")
    output.set_shared_memory(region, byte_size, offset)
    return output


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status()


def message_of(call) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.message()


# -- the protocol through the real clients ---------------------------------------------------------


def test_server_metadata_lists_the_extension(client, shm_server) -> None:
    assert "system_shared_memory" in client.get_server_metadata().extensions
    http = triton_http.InferenceServerClient(f"127.0.0.1:{shm_server.server.http_port}")
    assert "system_shared_memory" in http.get_server_metadata()["extensions"]


def test_inputs_from_a_region(client, regions) -> None:
    values = pixels(2)
    handle = create(regions, "in", values.nbytes)
    shm.set_shared_memory_region(handle, [values])
    client.register_system_shared_memory("in", key("in"), values.nbytes)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]["in"]
    assert (status["name"], status["key"], int(status["byte_size"])) == ("in", key("in"), values.nbytes)

    result = client.infer(MODEL, [shm_input("in", values)])
    np.testing.assert_allclose(result.as_numpy("LOGITS"), in_message(client, values), rtol=1e-5, atol=1e-5)


def test_outputs_into_a_region(client, regions) -> None:
    values = pixels(3, seed=1)
    handle = create(regions, "out", 3 * LOGITS_BYTES)
    client.register_system_shared_memory("out", key("out"), 3 * LOGITS_BYTES)
    tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)

    result = client.infer(MODEL, [tensor], outputs=[shm_output("out", 3 * LOGITS_BYTES)])
    output = result.get_output("LOGITS")
    assert (output.datatype, list(output.shape)) == ("FP32", [3, 1000])
    assert not result.get_response().raw_output_contents  # no data in the response, as Triton does
    assert output.parameters["shared_memory_region"].string_param == "out"
    assert output.parameters["shared_memory_byte_size"].int64_param == 3 * LOGITS_BYTES
    written = shm.get_contents_as_numpy(handle, np.float32, [3, 1000])
    np.testing.assert_allclose(written, in_message(client, values), rtol=1e-5, atol=1e-5)


def test_both_in_one_region_at_offsets(client, regions) -> None:
    """A region that starts 4 KB into its object, the input 64 bytes into it, the output after it."""
    values = pixels(1, seed=2)
    start, input_at = 4096, 64
    output_at = input_at + values.nbytes
    byte_size = output_at + LOGITS_BYTES
    handle = create(regions, "both", start + byte_size)
    shm.set_shared_memory_region(handle, [values], offset=start + input_at)
    client.register_system_shared_memory("both", key("both"), byte_size, offset=start)
    assert int(client.get_system_shared_memory_status("both", as_json=True)["regions"]["both"]["offset"]) == start

    result = client.infer(
        MODEL, [shm_input("both", values, input_at)], outputs=[shm_output("both", LOGITS_BYTES, output_at)]
    )
    assert result.get_output("LOGITS").parameters["shared_memory_offset"].int64_param == output_at
    written = shm.get_contents_as_numpy(handle, np.float32, [1, 1000], offset=start + output_at)
    np.testing.assert_allclose(written, in_message(client, values), rtol=1e-5, atol=1e-5)
    # The input is untouched: outputs are written only where they are asked for.
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, values.shape, start + input_at), values)


def test_streamed_requests_use_regions_too(shm_server, client, regions) -> None:
    import queue

    values = pixels(2, seed=5)
    handle = create(regions, "stream", values.nbytes + 2 * LOGITS_BYTES)
    shm.set_shared_memory_region(handle, [values])
    client.register_system_shared_memory("stream", key("stream"), values.nbytes + 2 * LOGITS_BYTES)
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(shm_server.target) as streaming:
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)))
        streaming.async_stream_infer(
            MODEL,
            [shm_input("stream", values)],
            outputs=[shm_output("stream", 2 * LOGITS_BYTES, values.nbytes)],
            request_id="7",
        )
        result, error = answers.get(timeout=60)
        streaming.stop_stream()
    assert error is None and result.get_response().id == "7"
    written = shm.get_contents_as_numpy(handle, np.float32, [2, 1000], offset=values.nbytes)
    np.testing.assert_allclose(written, in_message(client, values), rtol=1e-5, atol=1e-5)


def test_image_bytes_from_a_region_and_classes_into_one(client, regions, photos) -> None:
    images = np.array([photos["china"], photos["flower-crop"]], dtype=np.object_)
    serialized = serialize_byte_tensor(images)  # the message's framing: a 4-byte length, then the bytes
    framed = serialized.item()
    handle = create(regions, "images", len(framed))
    shm.set_shared_memory_region(handle, [serialized])
    create(regions, "classes", 4096)
    client.register_system_shared_memory("images", key("images"), len(framed))
    client.register_system_shared_memory("classes", key("classes"), 4096)
    tensor = triton.InferInput("IMAGE", [2], "BYTES")
    tensor.set_shared_memory("images", len(framed))
    top3 = triton.InferRequestedOutput("LOGITS", class_count=3)
    top3._output.parameters["shared_memory_region"].string_param = "classes"  # tritonclient refuses both at once
    top3._output.parameters["shared_memory_byte_size"].int64_param = 4096

    result = client.infer(MODEL, [tensor], outputs=[top3])
    assert list(result.get_output("LOGITS").shape) == [2, 3]
    written = shm.get_contents_as_numpy(regions["classes"], np.object_, [2, 3])
    sent = triton.InferInput("IMAGE", [2], "BYTES")
    sent.set_data_from_numpy(images)
    expected = client.infer(MODEL, [sent], outputs=[triton.InferRequestedOutput("LOGITS", class_count=3)])
    np.testing.assert_array_equal(written, expected.as_numpy("LOGITS"))
    assert handle is regions["images"]


def test_over_http_with_tritonclient_http(shm_server, client, regions) -> None:
    http = triton_http.InferenceServerClient(f"127.0.0.1:{shm_server.server.http_port}")
    values = pixels(2, seed=3)
    handle = create(regions, "http", values.nbytes + 2 * LOGITS_BYTES)
    shm.set_shared_memory_region(handle, [values])
    http.register_system_shared_memory("http", key("http"), values.nbytes + 2 * LOGITS_BYTES)
    assert http.get_system_shared_memory_status() == [
        {"name": "http", "key": key("http"), "offset": 0, "byte_size": values.nbytes + 2 * LOGITS_BYTES}
    ]
    assert http.get_system_shared_memory_status("http")[0]["name"] == "http"
    tensor = triton_http.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_shared_memory("http", values.nbytes)
    output = triton_http.InferRequestedOutput("LOGITS")
    output.set_shared_memory("http", 2 * LOGITS_BYTES, offset=values.nbytes)

    result = http.infer(MODEL, [tensor], outputs=[output])
    assert result.get_output("LOGITS") == {
        "name": "LOGITS",
        "datatype": "FP32",
        "shape": [2, 1000],
        "parameters": {
            "shared_memory_region": "http",
            "shared_memory_byte_size": 2 * LOGITS_BYTES,
            "shared_memory_offset": values.nbytes,
        },
    }
    written = shm.get_contents_as_numpy(handle, np.float32, [2, 1000], offset=values.nbytes)
    np.testing.assert_allclose(written, in_message(client, values), rtol=1e-5, atol=1e-5)
    with pytest.raises(InferenceServerException, match="no shared memory region 'nothing'"):
        http.get_system_shared_memory_status("nothing")
    http.unregister_system_shared_memory("http")
    assert http.get_system_shared_memory_status() == []
    assert http.is_server_live()


# -- what is refused ------------------------------------------------------------------------------------


def test_a_region_too_small(client, regions) -> None:
    values = pixels(1)
    create(regions, "small", LOGITS_BYTES)
    # Larger than the object it names.
    assert "run past the end" in message_of(
        lambda: client.register_system_shared_memory("small", key("small"), LOGITS_BYTES + 1)
    )
    client.register_system_shared_memory("small", key("small"), LOGITS_BYTES)
    # An input larger than the region.
    assert status_of(lambda: client.infer(MODEL, [shm_input("small", values)])) == "StatusCode.INVALID_ARGUMENT"
    # An output larger than the room given to it, or than the region.
    tensor = triton.InferInput("PIXELS", list(pixels(2).shape), "FP32")
    tensor.set_data_from_numpy(pixels(2))
    message = message_of(lambda: client.infer(MODEL, [tensor], outputs=[shm_output("small", LOGITS_BYTES)]))
    assert f"needs {2 * LOGITS_BYTES} bytes" in message
    assert "run past its end" in message_of(
        lambda: client.infer(MODEL, [tensor], outputs=[shm_output("small", 2 * LOGITS_BYTES)])
    )
    # A byte size that disagrees with the shape.
    wrong = triton.InferInput("PIXELS", [1, 3, SIDE, SIDE], "FP32")
    wrong.set_shared_memory("small", 16)
    assert "make them agree" in message_of(lambda: client.infer(MODEL, [wrong]))


def test_an_offset_past_the_end(client, regions) -> None:
    values = pixels(1)
    create(regions, "edge", values.nbytes)
    client.register_system_shared_memory("edge", key("edge"), values.nbytes)
    for offset in (1, values.nbytes, values.nbytes + 1, 2**40):
        message = message_of(lambda offset=offset: client.infer(MODEL, [shm_input("edge", values, offset)]))
        assert "run past its end" in message
    tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    assert "run past its end" in message_of(
        lambda: client.infer(MODEL, [tensor], outputs=[shm_output("edge", LOGITS_BYTES, values.nbytes)])
    )
    # Registering past the end of the object, by its offset.
    assert "run past the end" in message_of(
        lambda: client.register_system_shared_memory("late", key("edge"), 16, offset=values.nbytes)
    )


@pytest.mark.parametrize(
    "bad_key", ["../etc/passwd", "/a/b", "/../etc/passwd", "//x", "/", "", ".", "/..", "/x\x00y", "/" + "k" * 256]
)
def test_a_key_with_a_path_is_refused(client, bad_key: str) -> None:
    assert status_of(lambda: client.register_system_shared_memory("bad", bad_key, 16)) == "StatusCode.INVALID_ARGUMENT"


def test_symlinks_and_missing_objects_are_refused(client, tmp_path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 4096)
    link = SHM_DIRECTORY / key("link").lstrip("/")
    link.symlink_to(target)
    try:
        assert "symbolic link" in message_of(lambda: client.register_system_shared_memory("l", key("link"), 16))
    finally:
        link.unlink()
    assert "no shared memory object" in message_of(
        lambda: client.register_system_shared_memory("m", key("missing"), 16)
    )


def test_unknown_regions_and_names_taken(client, regions) -> None:
    create(regions, "once", 64)
    client.register_system_shared_memory("once", key("once"), 64)
    assert status_of(lambda: client.register_system_shared_memory("once", key("once"), 64)) == (
        "StatusCode.ALREADY_EXISTS"
    )
    assert status_of(lambda: client.get_system_shared_memory_status("nothing")) == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.unregister_system_shared_memory("nothing")) == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.infer(MODEL, [shm_input("nothing", pixels(1))])) == "StatusCode.NOT_FOUND"


def test_the_caps(client, regions) -> None:
    for index in range(MAX_REGIONS):
        create(regions, f"cap{index}", 64)
        client.register_system_shared_memory(f"cap{index}", key(f"cap{index}"), 64)
    create(regions, "over", MAX_BYTES + 64)
    assert "--max-shared-memory-regions" in message_of(
        lambda: client.register_system_shared_memory("over", key("over"), 64)
    )
    client.unregister_system_shared_memory()
    message = message_of(lambda: client.register_system_shared_memory("over", key("over"), MAX_BYTES + 1))
    assert "--max-shared-memory-bytes" in message
    assert status_of(lambda: client.register_system_shared_memory("over", key("over"), MAX_BYTES + 1)) == (
        "StatusCode.RESOURCE_EXHAUSTED"
    )
    client.register_system_shared_memory("over", key("over"), MAX_BYTES)  # exactly the cap is fine


def test_a_file_truncated_after_registration_is_refused_not_fatal(client, regions) -> None:
    """A mapping would die of SIGBUS here; the server reads and writes through the descriptor."""
    values = pixels(1)
    handle = create(regions, "shrinks", values.nbytes + LOGITS_BYTES)
    shm.set_shared_memory_region(handle, [values])
    client.register_system_shared_memory("shrinks", key("shrinks"), values.nbytes + LOGITS_BYTES)
    path = SHM_DIRECTORY / key("shrinks").lstrip("/")
    os.truncate(path, 100)
    assert status_of(lambda: client.infer(MODEL, [shm_input("shrinks", values)])) == "StatusCode.FAILED_PRECONDITION"
    tensor = triton.InferInput("PIXELS", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    message = message_of(
        lambda: client.infer(MODEL, [tensor], outputs=[shm_output("shrinks", LOGITS_BYTES, values.nbytes)])
    )
    assert "truncated" in message
    assert path.stat().st_size == 100  # an output never grows the file
    assert client.is_server_live()
    os.truncate(path, values.nbytes + LOGITS_BYTES)  # as it was, for the client library to let go of it


def test_requests_from_other_hosts_may_not_name_regions(shm_server, client, regions) -> None:
    """The servicer's rule, called as the gRPC and HTTP bindings call it for a non-loopback peer."""
    values = pixels(1)
    create(regions, "remote", values.nbytes)
    client.register_system_shared_memory("remote", key("remote"), values.nbytes)
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="PIXELS", datatype="FP32", shape=list(values.shape))
    tensor.parameters["shared_memory_region"].string_param = "remote"
    tensor.parameters["shared_memory_byte_size"].int64_param = values.nbytes
    servicer = shm_server.server._inference
    with pytest.raises(PermissionDeniedError, match="this host only"):
        shm_server.call(servicer.infer(request, Call("grpc", peer="ipv4:192.0.2.7:5000", local=False)))
    assert shm_server.call(servicer.infer(request, Call("http", local=True))).outputs[0].shape == [1, 1000]


def test_unregister_while_requests_use_the_region(shm_server, client, regions) -> None:
    """Requests racing an unregister either finish with the right answer or are told the region is
    gone; none fails otherwise, and the server stays live."""
    values = pixels(1, seed=4)
    expected = in_message(client, values)
    handle = create(regions, "busy", values.nbytes)
    shm.set_shared_memory_region(handle, [values])
    client.register_system_shared_memory("busy", key("busy"), values.nbytes)

    def run(_: int) -> str:
        with triton.InferenceServerClient(shm_server.target) as own:
            try:
                result = own.infer(MODEL, [shm_input("busy", values)])
            except InferenceServerException as error:
                assert error.status() == "StatusCode.NOT_FOUND", error.message()
                return "gone"
            np.testing.assert_allclose(result.as_numpy("LOGITS"), expected, rtol=1e-5, atol=1e-5)
            return "ok"

    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(run, range(24))
        client.unregister_system_shared_memory("busy")
        outcomes = list(answers)
    assert set(outcomes) <= {"ok", "gone"}
    assert client.get_system_shared_memory_status(as_json=True) == {}


# -- the owner of the regions, on its own -----------------------------------------------------------------


def test_a_lease_outlives_unregistering(regions) -> None:
    """Deterministically: a request holding a region reads it after an unregister; the descriptor
    closes with the last lease, and until then the region counts against the caps."""
    data = np.arange(256, dtype=np.uint8)
    handle = create(regions, "lease", 256)
    shm.set_shared_memory_region(handle, [data])
    owner = SharedMemoryRegions(max_regions=1, max_bytes=1024)
    owner.register("lease", key("lease"), 0, 256)
    tensor = SharedTensor("lease", 16, 32)
    with owner.leases() as held:
        region = held.hold(tensor, "input")
        owner.unregister("lease")
        with pytest.raises(RegionNotFoundError):
            owner.status("lease")
        with owner.leases() as other, pytest.raises(RegionNotFoundError):
            other.read(tensor, "input")
        with pytest.raises(SharedMemoryFullError):  # still open: still counted
            owner.register("again", key("lease"), 0, 256)
        np.testing.assert_array_equal(held.read(tensor, "input"), data[16:48])
    with pytest.raises(OSError):
        os.fstat(region._fd)  # closed with the last lease
    owner.register("again", key("lease"), 0, 256)
    owner.unregister("")


def test_the_owner_refuses_what_is_not_a_region(regions, tmp_path) -> None:
    owner = SharedMemoryRegions(max_regions=2, max_bytes=1024)
    create(regions, "own", 64)
    with pytest.raises(InvalidInputError):
        owner.register("", key("own"), 0, 64)
    with pytest.raises(InvalidInputError):
        owner.register("zero", key("own"), 0, 0)
    owner.register("own", key("own"), 0, 64)
    with pytest.raises(AlreadyExistsError):
        owner.register("own", key("own"), 0, 64)
    with owner.leases() as held:
        with pytest.raises(InvalidInputError, match="needs 65 bytes"):
            held.write(SharedTensor("own", 0, 64), b"x" * 65, "output")
        held.write(SharedTensor("own", 60, 4), b"abcd", "output")
    assert bytes(regions["own"]._mpsm_handle.buf[60:64]) == b"abcd"
    owner.unregister("")
    off = SharedMemoryRegions(max_regions=0, max_bytes=1024)
    with pytest.raises(FailedPreconditionError, match="off"):
        off.register("own", key("own"), 0, 64)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match="not a regular file"):
        SharedMemoryRegions(max_regions=1, max_bytes=64, directory=tmp_path).register("f", "/fifo", 0, 1)


@pytest.mark.parametrize(("given", "name"), [("/input0", "input0"), ("input0", "input0"), ("/a.b_c-9", "a.b_c-9")])
def test_shm_names(given: str, name: str) -> None:
    assert shm_file_name(given) == name


def test_encoded_images_keep_their_framing() -> None:
    """The helper the IMAGE test uses frames as the message does (a sanity check of the test itself)."""
    framed = serialize_byte_tensor(np.array([b"ab", b"c"], dtype=np.object_)).item()
    assert framed == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_the_example_of_the_docs_runs(shm_server, client, capsys) -> None:
    import re

    from tests.conftest import ROOT

    section = (ROOT / "docs" / "protocol.md").read_text().split("## System shared memory", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)[0]
    script = (
        script.replace("localhost:8001", shm_server.target)
        .replace('"resnet101"', f'"{MODEL}"')
        .replace('"/frames"', f'"{key("frames")}"')
    )
    exec(compile(script, "protocol.md", "exec"), {})
    (printed,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[\s*\d+\s+\d+\s+\d+\s+\d+\]", printed)
