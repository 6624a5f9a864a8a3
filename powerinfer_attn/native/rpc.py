"""ggml's RPC backend from Python: the patched server, and the servers' devices for a model.

A server is ``ggml_backend_rpc_start_server`` of the ``libggml-rpc`` next to the loaded
libllama, serving its CPU device (or its GPUs in a CUDA build): the upstream ``rpc-server``
tool is that function behind a command line. A client connects to each server with
``ggml_backend_rpc_add_server`` and names its devices in the model's parameters; the model then
places its offloaded layers (``n_gpu_layers``) on them, split by their memory as llama.cpp
splits over GPUs.

ggml aborts the process when it cannot reach a server or the versions differ, so
``check_server`` speaks the protocol's HELLO first and raises a clear error instead.
``ggml-rpc.patch`` gives the series a major version of its own (``RPC_PROTO_MAJOR``): a stock
server (majors below 100) or one of another op list is refused here.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
from pathlib import Path
from typing import Iterable, Sequence

from .bindings import EngineError, bindings

# ggml-rpc.patch's RPC_PROTO_MAJOR_VERSION; upstream's majors are below 100
RPC_PROTO_MAJOR = 101
_CMD_HELLO = 14          # RPC_CMD_HELLO: fixed by upstream for every version
_CONN_CAPS = 24          # RPC_CONN_CAPS_SIZE: the HELLO request's payload (zero: plain TCP)
_DEV_CPU, _DEV_GPU = 0, 1  # enum ggml_backend_dev_type

_connected: dict[str, int] = {}  # endpoint -> its ggml_backend_reg_t (ggml keeps one per endpoint)
_registered: set[str] = set()  # endpoints add_servers put in ggml's device list
_local_gpus: list[int] | None = None  # the GPU devices before any server was added


class RPCError(EngineError):
    pass


def parse_endpoints(spec: str | Iterable[str]) -> list[str]:
    """``"host:port[,host:port...]"`` (or a list of them) as a list; refuses a malformed one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (s.strip() for s in items):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RPCError(f"bad RPC server {item!r}: give host:port (e.g. 127.0.0.1:50052)")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise RPCError("no RPC server given")
    if len(set(out)) != len(out):
        raise RPCError(f"an RPC server is given twice: {','.join(out)}")
    return out


def hello(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """The ``(major, minor, patch)`` protocol version the server at ``endpoint`` speaks."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.sendall(struct.pack("<BQ", _CMD_HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
            head = _recv(s, 8)
            (size,) = struct.unpack("<Q", head)
            if size < 3 or size > 4096:
                raise RPCError(f"{endpoint} answered HELLO with {size} bytes: not a ggml RPC server")
            body = _recv(s, size)
    except TimeoutError as e:
        raise RPCError(f"the RPC server at {endpoint} did not answer within {timeout:g} s: it serves one client "
                       f"at a time, is another one connected?") from e
    except OSError as e:
        raise RPCError(f"cannot reach the RPC server at {endpoint} ({e}); start one with "
                       f"`powerinfer-attn rpc-server --host HOST --port PORT` there") from e
    return body[0], body[1], body[2]


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("the server closed the connection during HELLO")
        buf += chunk
    return buf


def check_server(endpoint: str) -> tuple[int, int, int]:
    """``hello``, refusing a server this build cannot run graphs on."""
    v = hello(endpoint)
    if v[0] != RPC_PROTO_MAJOR:
        what = ("a stock llama.cpp rpc-server, without the sparse attention ops" if v[0] < 100
                else "a server of another powerinfer-attn patch series")
        raise RPCError(f"the RPC server at {endpoint} speaks protocol {v[0]}.{v[1]}.{v[2]}, this build "
                       f"{RPC_PROTO_MAJOR}.x: {what}; start it with `powerinfer-attn rpc-server` "
                       f"from the same version as this client")
    return v


def _libs():
    C = bindings()
    lib_dir = Path(C._lib._name).parent
    try:
        ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
        rpc = ctypes.CDLL(str(lib_dir / "libggml-rpc.so"))
    except OSError as e:
        raise RPCError(f"this llama.cpp build has no RPC backend ({e}); run `powerinfer-attn build` again") from e
    vp = ctypes.c_void_p
    for name, res, args in (("ggml_backend_register", None, [vp]),
                            ("ggml_backend_dev_count", ctypes.c_size_t, []),
                            ("ggml_backend_dev_get", vp, [ctypes.c_size_t]),
                            ("ggml_backend_dev_type", ctypes.c_int, [vp]),
                            ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
                            ("ggml_backend_dev_backend_reg", vp, [vp]),
                            ("ggml_backend_reg_name", ctypes.c_char_p, [vp]),
                            ("ggml_backend_reg_dev_count", ctypes.c_size_t, [vp]),
                            ("ggml_backend_reg_dev_get", vp, [vp, ctypes.c_size_t])):
        getattr(ggml, name).restype, getattr(ggml, name).argtypes = res, args
    rpc.ggml_backend_rpc_add_server.restype, rpc.ggml_backend_rpc_add_server.argtypes = vp, [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_size_t, ctypes.POINTER(vp)]
    return ggml, rpc


def _devices(ggml, kind: int) -> list[int]:
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        d = ggml.ggml_backend_dev_get(i)
        reg = ggml.ggml_backend_dev_backend_reg(d)
        if ggml.ggml_backend_dev_type(d) == kind and not ggml.ggml_backend_reg_name(reg).startswith(b"RPC"):
            out.append(d)
    return out


def server_devices(endpoints: Sequence[str]) -> list[int]:
    """Check each server and connect to it (once per process); returns the devices a model split
    over ``endpoints`` offloads to: each server's devices in the given order, then this
    machine's GPUs (for ``llama_model_params.devices``). The servers are not added to ggml's
    device list, so models made without them never see them (nor a server that died since)."""
    global _local_gpus
    ggml, rpc = _libs()
    if _local_gpus is None:
        _local_gpus = _devices(ggml, _DEV_GPU)
    devs = []
    for ep in endpoints:
        if ep not in _connected:
            check_server(ep)
            reg = rpc.ggml_backend_rpc_add_server(ep.encode())
            if not reg:
                raise RPCError(f"the RPC server at {ep} has no device")
            _connected[ep] = reg
        reg = _connected[ep]
        devs += [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return devs + list(_local_gpus)


def add_servers(endpoints: Sequence[str]) -> list[int]:
    """``server_devices``, and the servers added to ggml's device list for the rest of the
    process: a ``llama_cpp.Llama(..., n_gpu_layers=N)`` made after this call puts its layers on
    them (llama-cpp-python has no other way to name them). Every later model that uses the
    default device list then needs the servers up."""
    ggml, _ = _libs()
    devs = server_devices(endpoints)
    for ep in endpoints:
        if ep not in _registered:
            ggml.ggml_backend_register(_connected[ep])
            _registered.add(ep)
    return devs


def local_devices() -> list[int] | None:
    """The devices a model without servers offloads to, once ``add_servers`` put servers in
    ggml's device list (which every later model's default list then holds); None before."""
    return list(_local_gpus) if _registered else None


def serve(host: str = "127.0.0.1", port: int = 50052, threads: int | None = None,
          cache_dir: str | Path | None = None, say=print) -> None:
    """Run the RPC server of the loaded llama.cpp build in this process until it is killed:
    the GPUs when the build has any, else the CPU device with ``threads`` threads."""
    import os

    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: the RPC protocol has no authentication or encryption; anyone who can reach "
            f"{host}:{port} can run code on this machine's backend and read its memory. "
            f"Bind 127.0.0.1 unless the network is trusted.")
    ggml, rpc = _libs()
    devs = _devices(ggml, _DEV_GPU) or _devices(ggml, _DEV_CPU)
    if not devs:
        raise RPCError("no CPU or GPU device in this build")
    arr = (ctypes.c_void_p * len(devs))(*devs)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # the C loop never returns to Python, so a Ctrl-C must end the process the default way
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    rpc.ggml_backend_rpc_start_server(endpoint.encode(), str(cache_dir).encode() if cache_dir else None,
                                      threads or min(os.cpu_count() or 1, 16), len(devs), arr)
    raise RPCError(f"the RPC server on {endpoint} stopped (port in use? see the lines above)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(port: int = 0, threads: int = 1, env: dict | None = None, timeout: float = 60.0,
          host: str = "127.0.0.1", cli: bool = False):
    """Start ``serve`` in a child process (of whatever llama_cpp ``env``'s Python imports), bound
    to ``host`` (``cli``: through the `rpc-server` command), and wait until it answers HELLO on
    127.0.0.1; returns ``(process, endpoint)``, the process's stderr piped. ``port`` 0: a free
    one. For tests and scripts; stop it with ``process.terminate()``."""
    import subprocess
    import sys
    import time

    port = port or free_port()
    if cli:
        args = ["-c", "from powerinfer_attn.cli import main; main()", "rpc-server", "--host", host,
                "--port", str(port), "-t", str(threads)]
    else:
        args = ["-c", f"from powerinfer_attn.native import rpc; rpc.serve({host!r}, {int(port)}, {int(threads)})"]
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ep = f"127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RPCError(f"the RPC server on {ep} exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            hello(ep, timeout=2)
            return proc, ep
        except RPCError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)


__all__ = ["RPC_PROTO_MAJOR", "RPCError", "add_servers", "check_server", "free_port", "hello", "local_devices",
           "parse_endpoints", "serve", "server_devices", "spawn"]
