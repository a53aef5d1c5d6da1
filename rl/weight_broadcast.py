"""Weight sync by collective broadcast (``--weight_sync broadcast``): the actor's rank 0 sends
every tensor of its full state dict straight to every rollout engine worker.

The members form one process group of their own, outside both the trainer's FSDP world and
vLLM's tensor-parallel world: rank 0 is the actor's rank 0, ranks ``1 + e * tp + w`` are worker
``w`` of engine ``e``. NCCL where CUDA is (tensors go GPU to GPU, never through host memory: the
way OpenRLHF and verl sync a 7B policy), gloo without it (what the CPU tests run; the code path is
the same). The group is built from a key-value store and the backend's ``ProcessGroup`` class
directly, not ``init_process_group``, because each member already belongs to another default
world. Before each sync rank 0 publishes the tensor list (names, shapes, dtypes) in the store as
JSON, so receivers allocate exactly what arrives.

The store is ours, not a ``TCPStore`` (which has no authentication): ``AuthStoreServer``, a
thread in rank 0 bound to 127.0.0.1 when every member is on this node, else to this node's
address (never to every interface), and ``AuthStore``, a ``torch.distributed.Store`` written in
Python that the process groups use. Rank 0 draws a random token in ``open``; the others get it
through Ray (the return value of ``open``, the arguments of ``join``), and the server closes any
connection whose first frame is not that token. What members read from the store is only ever
parsed as JSON (tensor names, shapes, dtypes).

Used by ``rl.workers.PolicyWorker`` (sender) and by ``WeightReceiverExtension``, which vLLM mixes
into its workers (``LLM(worker_extension_cls=...)``; ``rl.rollout.VLLMEngine`` always sets it).
"""

from __future__ import annotations

import datetime
import hmac
import json
import secrets
import socket
import struct
import threading
import time
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)  # a sync waits for the slowest member (a 70B gather)
LOOPBACK = "127.0.0.1"
TOKEN_BYTES = 32  # secrets.token_hex(32): 64 hex characters
HANDSHAKE_TIMEOUT_S = 10.0  # a client must send its token within this (else it is dropped)
MAX_FRAME = 1 << 31  # bytes of one key or value once authenticated


def node_ip() -> str:
    """An address of this node the other members can reach (Ray's view when in Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


def bind_host(member_ips: Iterable[str] = ()) -> str:
    """Where rank 0's store listens: 127.0.0.1 when every member runs on this node (their node
    IPs, as Ray reports them, are this node's or loopback), else this node's address."""
    here = node_ip()
    local = {here, LOOPBACK, "localhost", "::1"}
    return LOOPBACK if all(ip in local for ip in member_ips) else here


# -- wire format: every frame is a 4-byte big-endian length, then that many bytes ---------------
def _send_frames(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(struct.pack("!I", len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > limit:
        raise ConnectionError(f"frame of {n} bytes (limit {limit})")
    return _recv_exact(sock, n)


# request: the op's name, then its arguments, one frame each; reply: a status frame, then a value
_ARGS = {b"set": 2, b"get": 2, b"add": 2, b"compare_set": 3, b"wait": 2, b"check": 1,
         b"num_keys": 0, b"delete_key": 1}
_OK, _TIMEOUT = b"ok", b"timeout"


class AuthStoreServer:
    """A token-authenticated key-value server (one thread per connection). The first frame of
    every connection must be the token (compared in constant time), else the connection is closed
    without a reply; the server then answers the ops of ``AuthStore``."""

    def __init__(self, host: str, token: str, port: int = 0):
        if host in ("", "0.0.0.0", "::"):
            raise ValueError("the weight store never binds every interface: give one address")
        self._token = token.encode()
        self._data: dict[bytes, bytes] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="weight-store", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="weight-store-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._cond:
            self._conns.add(conn)
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            token = _recv_frame(conn, limit=4 * TOKEN_BYTES)
            if not hmac.compare_digest(token, self._token):
                return  # refused: closed without a byte written
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send_frames(conn, _OK)
            while not self._closed:
                op = _recv_frame(conn, limit=64)
                if op not in _ARGS:
                    return
                args = [_recv_frame(conn) for _ in range(_ARGS[op])]
                status, value = self._apply(op, args)
                _send_frames(conn, status, value)
        except (OSError, ConnectionError, ValueError, struct.error):
            pass
        finally:
            with self._cond:
                self._conns.discard(conn)
            conn.close()

    def _wait_for(self, keys: list[bytes], timeout_ms: int) -> bool:
        """Under ``self._cond``: wait until every key exists (or the timeout / close)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not all(k in self._data for k in keys):
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                return False
            self._cond.wait(min(left, 1.0))
        return True

    def _apply(self, op: bytes, args: list[bytes]) -> tuple[bytes, bytes]:
        with self._cond:
            if op == b"set":
                self._data[args[0]] = args[1]
                self._cond.notify_all()
            elif op == b"get":
                if not self._wait_for([args[0]], int(args[1])):
                    return _TIMEOUT, b""
                return _OK, self._data[args[0]]
            elif op == b"add":  # a counter, stored as decimal text like TCPStore's
                value = int(self._data.get(args[0], b"0")) + int(args[1])
                self._data[args[0]] = str(value).encode()
                self._cond.notify_all()
                return _OK, self._data[args[0]]
            elif op == b"compare_set":  # c10d's semantics (HashStore)
                key, expected, desired = args
                current = self._data.get(key)
                if (current is None and not expected) or current == expected:
                    self._data[key] = desired
                    self._cond.notify_all()
                    return _OK, desired
                return _OK, expected if current is None else current
            elif op == b"wait":
                keys = [k.encode() for k in json.loads(args[0])]
                return (_OK if self._wait_for(keys, int(args[1])) else _TIMEOUT), b""
            elif op == b"check":
                return _OK, b"1" if all(k.encode() in self._data for k in json.loads(args[0])) else b"0"
            elif op == b"num_keys":
                return _OK, str(len(self._data)).encode()
            elif op == b"delete_key":
                return _OK, b"1" if self._data.pop(args[0], None) is not None else b"0"
            return _OK, b""

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            with self._cond:
                conns, self._conns = list(self._conns), set()
                self._cond.notify_all()
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _bytes(v) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def _ms(t: datetime.timedelta) -> bytes:
    return str(max(int(t.total_seconds() * 1000), 0)).encode()


class AuthStore(dist.Store):
    """Client of ``AuthStoreServer``, usable wherever torch wants a ``Store`` (e.g. under
    ``dist.PrefixStore`` for ``ProcessGroupGloo`` / ``ProcessGroupNCCL``). ``get`` and ``wait``
    block until the keys exist, up to the timeout. C++ callers reach the Python methods by their
    C++ names where those differ (``getNumKeys``, ``deleteKey``: torch's ``PythonStore``)."""

    def __init__(self, host: str, port: int, token: str, timeout: datetime.timedelta = TIMEOUT):
        super().__init__()
        self._address, self._token, self._timeout = (host, port), token, timeout
        self._clones: list[AuthStore] = []
        self._lock = threading.Lock()
        self._sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
        try:
            _send_frames(self._sock, token.encode())
            if _recv_frame(self._sock, limit=16) != _OK:
                raise ConnectionError("unexpected handshake reply")
        except (OSError, ConnectionError) as e:
            self._sock.close()
            raise ConnectionError(f"the weight store at {host}:{port} refused this member (wrong token?)") from e
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _call(self, op: bytes, *args: bytes) -> bytes:
        with self._lock:
            _send_frames(self._sock, op, *args)
            status = _recv_frame(self._sock)
            value = _recv_frame(self._sock)
        if status == _TIMEOUT:
            raise dist.DistStoreError(f"weight store: {op.decode()} timed out after {self._timeout}")
        return value

    def set(self, key, value) -> None:
        self._call(b"set", _bytes(key), _bytes(value))

    def get(self, key) -> bytes:
        return self._call(b"get", _bytes(key), _ms(self._timeout))

    def add(self, key, value: int) -> int:
        return int(self._call(b"add", _bytes(key), str(int(value)).encode()))

    def compare_set(self, key, expected_value, desired_value) -> bytes:
        return self._call(b"compare_set", _bytes(key), _bytes(expected_value), _bytes(desired_value))

    def wait(self, keys, timeout: datetime.timedelta | None = None) -> None:
        names = [k.decode() if isinstance(k, bytes) else k for k in keys]
        self._call(b"wait", json.dumps(names).encode(), _ms(timeout or self._timeout))

    def check(self, keys) -> bool:
        names = [k.decode() if isinstance(k, bytes) else k for k in keys]
        return self._call(b"check", json.dumps(names).encode()) == b"1"

    def num_keys(self) -> int:
        return int(self._call(b"num_keys"))

    def delete_key(self, key) -> bool:
        return self._call(b"delete_key", _bytes(key)) == b"1"

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._timeout = timeout

    def clone(self) -> AuthStore:
        """Another connection to the same server (torch asks for one to use from another thread)."""
        c = AuthStore(*self._address, self._token, self._timeout)
        self._clones.append(c)  # the Python object must outlive its C++ users
        return c

    getNumKeys = num_keys
    deleteKey = delete_key

    def close(self) -> None:
        for c in self._clones:
            c.close()
        self._sock.close()


class BroadcastGroup:
    """One member of the weight group. Rank 0 calls ``open`` (it hosts the store) and every rank
    then ``join``s at the same time (joining waits for all members)."""

    def __init__(self):
        self.server: AuthStoreServer | None = None
        self.store: AuthStore | None = None
        self.pg = None
        self.device = torch.device("cpu")
        self.version = 0

    def open(self, world_size: int, member_ips: Iterable[str] = ()) -> tuple[str, int, str]:
        """Rank 0: start the store on a free port, bound as ``bind_host(member_ips)`` says (the
        node IPs of every member; none: all on this node); returns ``(host, port, token)``, which
        the others pass to ``join`` (hand it over through Ray, never through the store)."""
        token = secrets.token_hex(TOKEN_BYTES)
        self.server = AuthStoreServer(bind_host(member_ips), token)
        return self.server.host, self.server.port, token

    def join(self, host: str, port: int, token: str, rank: int, world_size: int, backend: str) -> None:
        self.store = AuthStore(host, port, token)
        if backend == "nccl":
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError("--weight_sync broadcast with NCCL needs a CUDA build of torch")
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(dist.PrefixStore("weights", self.store), rank, world_size)
        elif backend == "gloo":  # gloo's own sockets on loopback too when the group is local
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = TIMEOUT
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK if host == LOOPBACK else node_ip())]
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("weights", self.store), rank, world_size, opts)
        else:
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")

    def send(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Rank 0: publish the tensor list (JSON), then broadcast each tensor (in name order)."""
        self.version += 1
        names = sorted(state_dict)
        specs = [[k, list(state_dict[k].shape), str(state_dict[k].dtype).removeprefix("torch.")] for k in names]
        self.store.set(f"specs/{self.version}", json.dumps(specs))
        for k in names:
            t = state_dict[k].detach().to(self.device).contiguous()
            self.pg.broadcast(t, 0).wait()

    def receive_specs(self) -> list[tuple[str, list[int], torch.dtype]]:
        """Other ranks: the names, shapes and dtypes of the next state dict rank 0 sends (blocks
        until rank 0 publishes them; parsed as JSON, checked to be plain values)."""
        self.version += 1
        specs = json.loads(self.store.get(f"specs/{self.version}"))
        out = []
        for name, shape, dtype in specs:
            dt = getattr(torch, str(dtype), None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"weight broadcast: {name!r} has an unknown dtype {dtype!r}")
            out.append((str(name), [int(s) for s in shape], dt))
        return out

    def receive_tensors(self, specs: list[tuple[str, list[int], torch.dtype]]) -> TensorStream:
        """The tensors of ``specs``, received one broadcast per step (``TensorStream``)."""
        return TensorStream(self, specs)

    def receive(self) -> list[tuple[str, torch.Tensor]]:
        """Other ranks: the next whole state dict rank 0 sends (small models, tests)."""
        return list(self.receive_tensors(self.receive_specs()))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.server is not None:
            self.server.close()
        self.pg, self.store, self.server = None, None, None


class TensorStream:
    """``(name, tensor)`` pairs on the group's device, each received when asked for: a consumer
    that loads each before asking for the next (vLLM's ``load_weights``) holds one tensor at a
    time, never the whole state dict (OpenRLHF and verl load the same way). ``drain`` takes, and
    drops, whatever was not asked for (a refused dict, a load that failed half-way), so rank 0's
    broadcasts complete and the group stays in step for the next sync."""

    def __init__(self, group: BroadcastGroup, specs: list[tuple[str, list[int], torch.dtype]]):
        self.group, self.specs, self.taken = group, specs, 0

    def __iter__(self) -> TensorStream:
        return self

    def _next_tensor(self) -> tuple[str, torch.Tensor]:
        name, shape, dt = self.specs[self.taken]
        t = torch.empty(shape, dtype=dt, device=self.group.device)
        self.group.pg.broadcast(t, 0).wait()
        self.taken += 1
        return name, t

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self.taken == len(self.specs):
            raise StopIteration
        return self._next_tensor()

    def drain(self) -> int:
        """Receive and drop the rest; returns how many tensors that was."""
        left = len(self.specs) - self.taken
        while self.taken < len(self.specs):
            self._next_tensor()
        return left


class WeightReceiverExtension:
    """Methods vLLM adds to each of its workers (``worker_extension_cls``); called through
    ``LLM.collective_rpc``. ``self`` is the vLLM worker (``self.rank``: its tensor-parallel rank)."""

    def join_weight_group(self, host: str, port: int, token: str, rank_offset: int, world_size: int,
                          backend: str) -> None:
        self._weight_group = BroadcastGroup()
        self._weight_group.join(host, port, token, rank_offset + getattr(self, "rank", 0), world_size, backend)

    def receive_weights(self, specs, tied_word_embeddings: bool) -> int:
        """Receive one full state dict and load it tensor by tensor as it arrives; its names and
        shapes are checked against the engine's checkpoint first (``specs``), and a dict that does
        not fit is taken off the wire and refused with nothing loaded. Returns the number of tensors."""
        from rl.weight_sync import check_shapes

        group = self._weight_group
        arriving = group.receive_specs()
        stream = group.receive_tensors(arriving)
        try:
            check_shapes({name: shape for name, shape, _ in arriving}, specs, tied_word_embeddings)
            self.reload_weights(weights_iterator=stream)
        finally:
            stream.drain()  # what was not loaded (a refused dict): taken off the wire, dropped
        return len(arriving)
