"""``xattn serve``: one artifact behind a real Triton Inference Server, through PyTriton.

The toolkit's own Runner (ONNX Runtime here; TensorRT where it is installed) runs inside Triton's
python backend, so the server checks inputs exactly as ``xattn run`` does. Triton provides the rest:
the KServe v2 HTTP and gRPC endpoints (inference, health, metadata, statistics) and dynamic batching.
Triton batches only requests whose inputs have equal shapes, so maps of different sizes never meet
in one batch; within a batch the requests are concatenated along the batch axis and split again.

Bad requests never reach Triton: its HTTP and gRPC endpoints listen on private loopback ports, and the
checking fronts of :mod:`runtime.serve_front` take the public ones, refusing each bad request alone (400 /
INVALID_ARGUMENT, one line) before the dynamic batcher can put it beside good ones. The Runner's checks
inside the model stay as a second line (PyTriton reports an error per call of the model, so a request that
got past the fronts would fail its batch). Binds loopback unless ``host`` says otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from xattn.errors import SIGNALLED, BadInputError, CheckFailedError, MissingDependencyError, Terminated
from xattn.triton import SERVE_HINT, server_environment


#: seconds Triton waits for requests in flight when asked to stop
EXIT_TIMEOUT_S = 3


@dataclass
class ServeSettings:
    """Attributes:
        host: address to bind (default loopback; ``0.0.0.0`` exposes the server to the network).
        http_port / grpc_port: KServe v2 ports (defaults 8000 / 8001).
        name: the model's name on the server (default: from the file name).
        max_batch_size: Triton's max batch (default: the artifact's recorded max batch, capped at 8).
        delay_us: the dynamic batcher's max queue delay in microseconds (default 100).
        threads / providers: ONNX Runtime settings of the runner.
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    name: str | None = None
    max_batch_size: int | None = None
    delay_us: int = 100
    threads: int | None = None
    providers: list[str] | None = None


class BatchServer:
    """The model callable PyTriton binds: check each request, run same-shape requests as one batch."""

    def __init__(self, runner):
        self.runner = runner
        # One inference at a time: ONNX Runtime sessions are thread-safe, but concurrent runs would each
        # start the session's thread pool and oversubscribe the cores.
        self.lock = threading.Lock()
        self.largest_batch = 0

    def __call__(self, requests) -> list[dict[str, np.ndarray]]:
        from runtime.base import check_inputs

        meta = self.runner.input_metadata
        for index, request in enumerate(requests):
            feed = {name: request[name] for name in request.data}
            try:
                check_inputs(feed, meta, allow_nonfinite=False)
            except BadInputError as exc:
                raise ValueError(f"request {index + 1} of {len(requests)} in this batch: {exc}") from None
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            key = tuple(sorted((name, request[name].shape[1:]) for name in request.data))
            groups.setdefault(key, []).append(index)
        responses: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        for indices in groups.values():
            names = list(requests[indices[0]].data)
            feed = {name: np.concatenate([requests[i][name] for i in indices]) for name in names}
            with self.lock:
                outputs = self.runner.infer(feed)
            self.largest_batch = max(self.largest_batch, int(next(iter(feed.values())).shape[0]))
            start = 0
            for i in indices:
                rows = requests[i][names[0]].shape[0]
                responses[i] = {name: value[start:start + rows] for name, value in outputs.items()}
                start += rows
        return responses   # type: ignore[return-value]


def make_shared_memory_private() -> list[Path]:
    """Mode 0600 on the shared-memory regions that carry this server's tensors. Triton's python backend creates
    them 0644 whatever the umask (``/dev/shm/pytrtion<pid>-...``: every local user could read the requests);
    the stub and Triton run as this user, so they keep their access. A region is readable by others from its
    creation until this runs (at start, then every 0.2 s). Returns the regions changed."""
    changed = []
    for region in Path("/dev/shm").glob(f"pytrtion{os.getpid()}-*"):
        try:
            if region.stat().st_mode & 0o077:
                region.chmod(0o600)
                changed.append(region)
        except OSError:   # gone meanwhile
            continue
    return changed


def tensor_specs(runner, artifact: Path) -> tuple[list, list]:
    """PyTriton ``Tensor`` declarations: dims without the batch axis, -1 where sizes vary."""
    from pytriton.model_config import Tensor

    inputs = [Tensor(name=name, dtype=np.dtype(meta.dtype).type,
                     shape=tuple(-1 if not isinstance(d, int) else d for d in meta.shape[1:]))
              for name, meta in runner.input_metadata.items()]
    declared = output_declarations(artifact)
    outputs = [Tensor(name=name, dtype=declared.get(name, (np.float32, 4))[0],
                      shape=(-1,) * (declared.get(name, (np.float32, 4))[1] - 1))
               for name in runner.output_names]
    return inputs, outputs


def output_declarations(artifact: Path) -> dict[str, tuple[type, int]]:
    """Output dtype and rank from the ONNX graph; engines (no graph to read here) are declared float32,
    rank 4, the toolkit's engines' outputs."""
    if artifact.suffix.lower() != ".onnx":
        return {}
    from onnx import helper

    from xattn.onnxfile import load_onnx

    return {o.name: (helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).type,
                     len(o.type.tensor_type.shape.dim)) for o in load_onnx(artifact).graph.output}


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on, or None. IPv4 and IPv6 alike; binds with SO_REUSEADDR as servers
    do, so a port left in TIME_WAIT by a server that just died counts as free (it is, for a new server)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"{host} is not an address ({exc.strerror})"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"cannot bind {host}:{port} ({exc.strerror})"
    return None



def serve(artifact: str | os.PathLike, settings: ServeSettings | None = None,
          say: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> dict:
    """Serve ``artifact`` until Ctrl-C, SIGTERM or ``stop`` is set; returns what was served."""
    settings = settings or ServeSettings()
    say = say or (lambda message: None)
    artifact = Path(artifact)
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError as exc:
        raise MissingDependencyError("xattn serve needs nvidia-pytriton", hint=SERVE_HINT) from exc
    from runtime.open import artifact_kind, open_runner
    from runtime.validate import artifact_record
    from xattn.shapes import parse_shape_set

    if artifact_kind(artifact) not in ("onnx", "engine"):
        raise BadInputError(f"{artifact}: xattn serve serves ONNX files and engines", hint="export the model first")
    if not artifact.is_file():
        raise BadInputError(f"{artifact} does not exist")
    record = artifact_record(artifact)
    recorded = max((s[0] for s in parse_shape_set(record["max_shapes"]).values()), default=1) \
        if record.get("max_shapes") else 1
    max_batch = settings.max_batch_size or min(recorded, 8)
    if max_batch > recorded:
        raise BadInputError(f"--max-batch-size {max_batch} is above the batch {recorded} that {artifact.name} was "
                            "exported and verified for", hint=f"use at most {recorded}")
    name = settings.name or "".join(c if c.isalnum() or c in "_-" else "_" for c in artifact.name.rsplit(".", 1)[0])
    # the python backend's stub must load this interpreter's libpython (xattn.triton's docstring)
    os.environ["LD_LIBRARY_PATH"] = server_environment()["LD_LIBRARY_PATH"]
    for label, port in (("--http-port", settings.http_port), ("--grpc-port", settings.grpc_port)):
        problem = port_problem(settings.host, port)   # before loading anything: PyTriton would fail late and loudly
        if problem:
            raise BadInputError(f"{label} {port}: {problem}",
                                hint="choose another port" if "in use" in problem else "give --host an address of "
                                "this machine (127.0.0.1, ::1, 0.0.0.0)")
    runner = open_runner(artifact, providers=settings.providers, threads=settings.threads, name=name)
    log_file = Path(tempfile.gettempdir()) / f"xattn-serve-{os.getpid()}.log"
    # exit_timeout_secs: on SIGTERM Triton waits this long for requests in flight (its default, 30 s, made a
    # stop take 31 s when idle and as long as clients kept sending under load)
    # Triton's own HTTP and gRPC endpoints listen on loopback only, on private ports: the checked fronts
    # (runtime/serve_front.py) take the addresses and ports the user asked for
    from xattn.triton import free_port

    config = TritonConfig(http_address="127.0.0.1", http_port=free_port(), grpc_address="127.0.0.1",
                          grpc_port=free_port(), allow_metrics=False, log_verbose=0, log_file=log_file,
                          exit_timeout_secs=EXIT_TIMEOUT_S)
    import logging

    logging.getLogger("pytriton").setLevel(logging.WARNING)   # its INFO lines repeat Triton's startup table
    from xattn.fileio import remove_abandoned

    # PyTriton's workspace (sockets, the model's files) under a name that says whose it is: a killed run's is
    # removed by the next one (PyTriton's own random names under ~/.cache/pytriton were left for good)
    workspaces = Path.home() / ".cache" / "xattn"
    workspaces.mkdir(parents=True, exist_ok=True)
    remove_abandoned(workspaces, "serve-*")
    workspace = workspaces / f"serve-{os.getpid()}"
    # what Triton and PyTriton create from here (the shared-memory regions that carry request tensors, the
    # workspace, the log) is readable by this user only
    previous_umask = os.umask(0o077)
    try:
        return _serve_in(runner, artifact, name, max_batch, settings, config, log_file, say, stop, workspace)
    finally:
        os.umask(previous_umask)
        shutil.rmtree(workspace, ignore_errors=True)   # PyTriton leaves it when Triton died under it


def _serve_in(runner, artifact, name, max_batch, settings, config, log_file, say, stop, workspace) -> dict:
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonSecurityConfig

    with runner:
        model = BatchServer(runner)
        inputs, outputs = tensor_specs(runner, artifact)
        # PyTriton protects these endpoints with a random token; statistics stay readable (per-model request
        # and batch counts: how a client sees that batching happens), the rest stays protected.
        security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
        with Triton(config=config, security_config=security, workspace=workspace) as triton:
            triton.bind(model_name=name, infer_func=model, inputs=inputs, outputs=outputs,
                        config=ModelConfig(max_batch_size=max_batch,
                                           batcher=DynamicBatcher(max_queue_delay_microseconds=settings.delay_us)),
                        strict=True)
            try:
                triton.run()
            except Exception as exc:   # PyTriton's and tritonclient's errors: one line, not their traceback
                raise CheckFailedError(f"Triton did not start: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:300]}; its log: {log_file}") from exc
            from runtime.serve_front import GrpcFront, InferenceFront, limits_for

            limits = limits_for(runner, max_batch)
            front = InferenceFront(settings.host, settings.http_port, config.http_port, name, limits).start()
            grpc_front = GrpcFront(settings.host, settings.grpc_port, config.grpc_port, limits, front.max_body).start()
            make_shared_memory_private()
            say(f"serving {artifact} as model {name!r} (max batch {max_batch}) on http://{settings.host}:"
                f"{settings.http_port} and grpc://{settings.host}:{settings.grpc_port}; Triton's log: {log_file}; "
                "Ctrl-C or SIGTERM stops")
            try:
                while not (stop is not None and stop.is_set()):
                    time.sleep(0.2)
                    make_shared_memory_private()
                    if not triton.is_alive():   # Triton died (a request it could not survive, OOM, a kill)
                        raise CheckFailedError(f"Triton stopped serving (tritonserver or its model process exited); "
                                               f"its log: {log_file}", hint="the end of that log says why")
            except (KeyboardInterrupt, Terminated):
                # the way a server is asked to stop: a clean shutdown follows, and the exit is 0
                SIGNALLED["signum"] = None
                say("stopping: waiting for requests in flight")
            finally:
                front.stop()
                grpc_front.stop()
    return {"model": name, "artifact": str(artifact), "max_batch_size": max_batch,
            "largest_batch_seen": model.largest_batch, "refused_at_the_front": front.refused + grpc_front.refused}
