"""The endpoints ``xattn serve`` exposes: every inference request is checked here, then passed to Triton.

Triton 2.51's HTTP front end allocates what a JSON request *declares* before it looks at the data: four values
declared as ``[1, 3, 100000, 100000]`` made it throw ``std::bad_alloc`` and abort the whole server. So Triton's
HTTP port is bound to loopback on a private port, and this front, on the address the user asked for, reads each
request's inference header first and refuses (400, one line of JSON, no traceback) anything outside what the
artifact was exported and verified for:

* a body over the largest valid request (413), or without a Content-Length (411);
* an input the model does not have, a datatype other than the declared one, a rank or a size outside the
  recorded ranges (batch up to the served max batch), a data length that does not match the shape;
* NaN or Inf in the values (JSON numbers or binary tensor data alike);
* Triton's administrative endpoints (repository, shared memory, trace, logging): 403.

Each request is judged alone, so a bad one is refused before the dynamic batcher can put it beside good ones.
Everything else (health, metadata, statistics, good inferences) is passed through unchanged. gRPC goes
through :class:`GrpcFront`, which checks ``ModelInfer`` requests the same way (INVALID_ARGUMENT) and passes the rest
through as bytes.
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

#: KServe v2 datatype -> numpy dtype, for the types the toolkit's artifacts take
V2_TYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
            "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
#: paths only Triton's administrator uses; PyTriton guards them with a token it passes on tritonserver's command
#: line (readable by local users), so this front refuses them outright
RESTRICTED = ("/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/trace", "/v2/logging")
#: bytes a JSON-encoded number may take at most in a request we accept ("-1.2345678901234567e-123,")
JSON_BYTES_PER_VALUE = 32


@dataclass(frozen=True)
class InputLimits:
    """What one input may be: its v2 datatype and, per axis, the inclusive (low, high) size."""

    datatype: str
    axes: tuple[tuple[int, int], ...]

    @property
    def max_elements(self) -> int:
        return int(np.prod([high for _, high in self.axes], dtype=np.int64))


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_infer_request(body: bytes, header_length: int | None, limits: dict[str, InputLimits]) -> None:
    """Raise :class:`RequestError` unless ``body`` is a v2 inference request within ``limits`` (see the module
    docstring). Read as data only; nothing is allocated from a declared shape before it is checked."""
    cut = len(body) if header_length is None else header_length
    if not 0 <= cut <= len(body):
        raise RequestError(400, f"Inference-Header-Content-Length {cut} is outside the body ({len(body)} bytes)")
    try:
        header = json.loads(body[:cut], parse_constant=_refuse_constant)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the inference header is not JSON ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "the request has no \"inputs\" list")
    offset = cut
    seen = set()
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(400, "an input without a name")
        name = item["name"]
        if name in seen:
            raise RequestError(400, f"input {name} is given twice")
        seen.add(name)
        shape = item.get("shape")
        count, dtype = check_declared(name, item.get("datatype"), shape, limits)
        parameters = item.get("parameters") if isinstance(item.get("parameters"), dict) else {}
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
                raise RequestError(400, f"input {name}: binary_data_size {size} is not {count} x {dtype.itemsize} bytes")
            if offset + size > len(body):
                raise RequestError(400, f"input {name}: the body ends before its {size} bytes of data")
            values = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            offset += size
        elif "data" in item:
            values = np.asarray(_flatten(item["data"], count, name), dtype=np.float64)
            if values.size != count:
                raise RequestError(400, f"input {name}: {values.size} values for shape {shape} ({count})")
        else:
            raise RequestError(400, f"input {name} has neither data nor binary_data_size")
        check_finite(name, values, dtype)
    missing = sorted(set(limits) - seen)
    if missing:
        raise RequestError(400, f"missing input(s) {', '.join(missing)}")


def check_declared(name: str, datatype, shape, limits: dict[str, InputLimits]) -> tuple[int, np.dtype]:
    """The element count and dtype of a declared input, or :class:`RequestError` when the declaration itself is
    outside what the model takes (before any data is looked at)."""
    if name not in limits:
        raise RequestError(400, f"unknown input {name[:40]!r}; the model takes {', '.join(sorted(limits))}")
    want = limits[name]
    if datatype != want.datatype:
        raise RequestError(400, f"input {name} is {str(datatype)[:10]}, the model takes {want.datatype}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(400, f"input {name}: shape must be a list of integers")
    if len(shape) != len(want.axes):
        raise RequestError(400, f"input {name} has rank {len(shape)}, the model takes {len(want.axes)}")
    for axis, (size, (low, high)) in enumerate(zip(shape, want.axes)):
        if not low <= size <= high:
            raise RequestError(400, f"input {name}: axis {axis} is {size}, outside the supported range {low}..{high}")
    return int(np.prod(shape, dtype=np.int64)), np.dtype(V2_TYPES[want.datatype])


def check_finite(name: str, values: np.ndarray, dtype: np.dtype) -> None:
    if dtype.kind == "f" and not np.isfinite(values).all():
        raise RequestError(400, f"input {name} holds NaN/Inf values")


#: gRPC methods only Triton's administrator uses (refused, as their HTTP paths are)
RESTRICTED_GRPC = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
                   "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
                   "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings")
#: ModelInferRequest's typed contents field per datatype
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents",
             "INT8": "int_contents", "UINT8": "uint_contents", "BOOL": "bool_contents"}


def check_grpc_infer(data: bytes, limits: dict[str, InputLimits]) -> None:
    """:func:`check_infer_request` for a KServe v2 gRPC ``ModelInferRequest`` (raw or typed contents)."""
    from tritonclient.grpc import service_pb2

    try:
        request = service_pb2.ModelInferRequest.FromString(data)
    except Exception:   # protobuf's DecodeError and friends
        raise RequestError(400, "the request is not a ModelInferRequest") from None
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(400, f"{len(raw)} raw input contents for {len(request.inputs)} inputs")
    seen = set()
    for index, tensor in enumerate(request.inputs):
        if tensor.name in seen:
            raise RequestError(400, f"input {tensor.name} is given twice")
        seen.add(tensor.name)
        count, dtype = check_declared(tensor.name, tensor.datatype, list(tensor.shape), limits)
        if raw:
            if len(raw[index]) != count * dtype.itemsize:
                raise RequestError(400, f"input {tensor.name}: {len(raw[index])} bytes of data for {count} values")
            values = np.frombuffer(raw[index], dtype=dtype)
        else:
            field = _CONTENTS.get(tensor.datatype)
            values = np.asarray(getattr(tensor.contents, field) if field else [], dtype=np.float64)
            if values.size != count:
                raise RequestError(400, f"input {tensor.name}: {values.size} values for its shape ({count})")
        check_finite(tensor.name, values, dtype)
    missing = sorted(set(limits) - seen)
    if missing:
        raise RequestError(400, f"missing input(s) {', '.join(missing)}")


class GrpcFront:
    """The gRPC counterpart of :class:`InferenceFront`: a generic gRPC server on ``(host, port)`` that checks every
    ``ModelInfer`` request (INVALID_ARGUMENT, one line, before Triton), refuses the administrative methods
    (PERMISSION_DENIED) and streaming (UNIMPLEMENTED: for decoupled models, which this server has none of), and
    passes every other call through as bytes to Triton's gRPC endpoint on ``127.0.0.1:upstream_port``."""

    def __init__(self, host: str, port: int, upstream_port: int, limits: dict[str, InputLimits], max_bytes: int,
                 timeout_s: float = 300.0):
        from concurrent import futures

        import grpc

        self.refused = 0
        front = self
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{upstream_port}", options=unlimited)

        def forward(method: str):
            call = self.channel.unary_unary(method)

            def behaviour(request: bytes, context):
                if method.endswith("/ModelInfer"):
                    try:
                        check_grpc_infer(request, limits)
                    except RequestError as exc:
                        front.refused += 1
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                try:
                    return call(request, timeout=timeout_s, metadata=context.invocation_metadata())
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details() or "")
            return behaviour

        def refuse(code, message):
            def behaviour(request, context):
                front.refused += 1
                context.abort(code, message)
            return behaviour

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                name = details.method.rsplit("/", 1)[-1]
                if name in RESTRICTED_GRPC:
                    return grpc.unary_unary_rpc_method_handler(
                        refuse(grpc.StatusCode.PERMISSION_DENIED, f"{name} is not served here"))
                if name == "ModelStreamInfer":
                    return grpc.stream_stream_rpc_method_handler(
                        refuse(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is for decoupled models; "
                                                              "use ModelInfer"))
                return grpc.unary_unary_rpc_method_handler(forward(details.method))

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), handlers=[Handler()],
                                  options=[("grpc.max_receive_message_length", max_bytes),
                                           ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.server.add_insecure_port(address) == 0:
            raise OSError(f"cannot bind gRPC to {address}")

    def start(self) -> "GrpcFront":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=0).wait()
        self.channel.close()


def _refuse_constant(name: str):
    raise RequestError(400, f"{name} in the request's JSON (NaN/Inf values are refused)")


def _flatten(data, limit: int, name: str) -> list:
    """Nested JSON lists flattened, stopping once ``limit`` is exceeded (a huge list is refused, not copied)."""
    out: list = []
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(value)
            if len(out) > limit:
                raise RequestError(400, f"input {name}: more values than its shape holds")
        else:
            raise RequestError(400, f"input {name}: data holds a {type(value).__name__}, not numbers")
    return out


class InferenceFront:
    """A threaded HTTP server on ``(host, port)`` that checks inference requests (see the module docstring) and
    passes everything else through to Triton's HTTP endpoint on ``127.0.0.1:upstream_port``."""

    def __init__(self, host: str, port: int, upstream_port: int, model: str, limits: dict[str, InputLimits],
                 timeout_s: float = 300.0):
        self.upstream_port, self.model, self.limits, self.timeout_s = upstream_port, model, limits, timeout_s
        self.max_body = sum(lim.max_elements * max(JSON_BYTES_PER_VALUE, np.dtype(V2_TYPES[lim.datatype]).itemsize)
                            for lim in limits.values()) + (1 << 16)
        self.refused = 0
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):   # noqa: A002 - the base class's name; Triton logs requests
                pass

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _refuse(self, status: int, message: str) -> None:
                front.refused += 1
                self.close_connection = status in (411, 413)   # the unread body would be taken for a request
                self._reply(status, json.dumps({"error": message}).encode())

            def _handle(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith(RESTRICTED):
                    return self._refuse(403, f"{path.split('/')[2]} is not served here")
                body = b""
                if self.command in ("POST", "PUT"):
                    length = self.headers.get("Content-Length")
                    if length is None or not length.isdigit():
                        return self._refuse(411, "a request body needs a Content-Length")
                    if int(length) > front.max_body:
                        return self._refuse(413, f"the body is {int(length)} bytes; the largest request this model "
                                                 f"takes is {front.max_body} bytes")
                    body = self.rfile.read(int(length))
                if self.command == "POST" and path.rstrip("/").endswith("/infer"):
                    header = self.headers.get("Inference-Header-Content-Length")
                    try:
                        if header is not None and not header.isdigit():
                            raise RequestError(400, "Inference-Header-Content-Length is not a number")
                        check_infer_request(body, int(header) if header is not None else None, front.limits)
                    except RequestError as exc:
                        return self._refuse(exc.status, str(exc))
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                keep = {k: v for k, v in self.headers.items()
                        if k.lower() not in ("host", "connection", "keep-alive", "transfer-encoding")}
                connection = http.client.HTTPConnection("127.0.0.1", front.upstream_port, timeout=front.timeout_s)
                try:
                    connection.request(self.command, self.path, body=body or None, headers=keep)
                    answer = connection.getresponse()
                    data = answer.read()
                except (OSError, http.client.HTTPException) as exc:
                    return self._reply(503, json.dumps({"error": f"Triton is not answering ({exc.__class__.__name__})"})
                                       .encode())
                finally:
                    connection.close()
                headers = {k: v for k, v in answer.getheaders()
                           if k.lower() not in ("content-length", "connection", "transfer-encoding", "keep-alive")}
                self._reply(answer.status, data, headers)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = _family(host)

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="xattn-http-front", daemon=True)

    def start(self) -> "InferenceFront":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _family(host: str):
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def limits_for(runner, max_batch: int) -> dict[str, InputLimits]:
    """Each input's datatype and per-axis range from the runner's metadata (the ranges recorded at export), the
    batch axis up to the served max batch. Axes without a recorded range keep their fixed size."""
    names = {np.dtype(v).name: k for k, v in V2_TYPES.items()}
    limits = {}
    for name, meta in runner.input_metadata.items():
        axes = []
        for axis, size in enumerate(meta.shape):
            if axis == 0:
                axes.append((1, max_batch))
            elif isinstance(size, int):
                axes.append((size, size))
            else:
                low, high = meta.ranges.get(axis, (1, 1 << 16))
                axes.append((int(low), int(high)))
        limits[name] = InputLimits(names[np.dtype(meta.dtype).name], tuple(axes))
    return limits
