"""The real Triton Inference Server core that the ``nvidia-pytriton`` wheel carries, started and stopped here.

The wheel ships ``tritonserver`` (2.51) with the python backend only: Triton's ``onnxruntime`` and
``tensorrt`` backends live in NVIDIA's containers. That is still Triton's own model-configuration code,
so a repository loaded into it is checked by Triton itself up to "backend not installed" (or "no GPU").

One trap, found on these machines: the python backend's stub must load the running interpreter's
libpython, not the system's (a Debian 3.11.2 libpython under pyenv's 3.11.7 standard library failed with
``'_thread.RLock' object has no attribute '_recursion_count'``), so ``LD_LIBRARY_PATH`` starts with this
interpreter's ``sysconfig`` LIBDIR.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from xattn.errors import MissingDependencyError, XattnError

SERVE_HINT = "pip install 'xattn-deploy[serve]' (nvidia-pytriton and tritonclient)"


def pytriton_root() -> Path:
    """The ``pytriton`` package folder (its ``tritonserver/`` holds the server)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise MissingDependencyError("serving on Triton needs nvidia-pytriton, which is not installed", hint=SERVE_HINT)
    return Path(spec.origin).parent


def server_environment() -> dict[str, str]:
    """Environment for ``tritonserver`` and its python-backend stub (see the module docstring)."""
    root = pytriton_root()
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent / "nvidia_pytriton.libs"),
            str(root / "tritonserver" / "external_libs")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p and Path(p).is_dir()]
                                      + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In a child before exec (Linux): the kernel sends it SIGKILL when the toolkit's process dies, however it
    dies (SIGKILL included), so no tritonserver outlives the command that started it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: the context manager's exit is the only guard
        pass


class TritonCore:
    """``tritonserver --model-control-mode explicit`` on a repository, on free loopback ports.

    Used as a context manager; :meth:`load` asks the server to load one model and returns Triton's own
    answer. The server's log is kept: a model whose configuration Triton rejects while polling the
    repository is explained only there.
    """

    def __init__(self, repository: str | os.PathLike, *, startup_seconds: float = 60.0):
        self.repository = Path(repository)
        self.startup_seconds = startup_seconds
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self._log = None

    def __enter__(self) -> "TritonCore":
        root = pytriton_root() / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if not binary.is_file():
            raise MissingDependencyError(f"nvidia-pytriton carries no tritonserver at {binary}", hint=SERVE_HINT)
        self.http_port, self.grpc_port = free_port(), free_port()
        self._log = tempfile.NamedTemporaryFile("w+", prefix="xattn-tritonserver-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [str(binary), "--model-repository", str(self.repository.resolve()), "--model-control-mode", "explicit",
             "--backend-directory", str(root / "backends"), "--http-address", "127.0.0.1",
             "--http-port", str(self.http_port), "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
             "--allow-metrics", "false", "--exit-on-error", "false", "--log-verbose", "0"],
            stdout=self._log, stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True,
            preexec_fn=die_with_parent)
        try:
            deadline = time.monotonic() + self.startup_seconds
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise XattnError(f"tritonserver exited at start (code {self.process.returncode}): "
                                     f"{self.log()[-600:]}")
                if self._get("/v2/health/live")[0] == 200:
                    return self
                time.sleep(0.2)
            raise XattnError(f"tritonserver did not come up within {self.startup_seconds:.0f} s")
        except BaseException:   # a signal during start-up too: __exit__ would never run, the server would stay
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def _get(self, path: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, OSError):
            return 0, ""

    def load(self, model: str) -> tuple[bool, str]:
        """(loaded, Triton's message); for a repository poll failure, the reason from the server log."""
        status, body = self._get(f"/v2/repository/models/{model}/load", method="POST")
        if status == 200:
            return True, "loaded"
        try:
            message = json.loads(body).get("error", body)
        except (json.JSONDecodeError, AttributeError):
            message = body
        if "failed to poll from model repository" in message:
            found = re.findall(rf"Poll failed for model directory '{re.escape(model)}': (.*?)\"?$", self.log(), re.M)
            if found:
                message = found[-1]
        return False, " ".join(str(message).split())
