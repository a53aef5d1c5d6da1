"""Issue #12 (security): the weight-broadcast rendezvous is token-authenticated, bound to loopback
for single-node use and carries JSON, never pickle; checkpoints load with ``weights_only=True``.
Fast (no Ray, no vLLM): one extra Python process for the 2-member gloo group."""

from __future__ import annotations

import ast
import json
import re
import os
import socket
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from rl.weight_broadcast import (
    LOOPBACK, AuthStore, AuthStoreServer, BroadcastGroup, bind_host, node_ip,
)

ROOT = Path(__file__).resolve().parents[1]


def frame(b: bytes) -> bytes:
    return struct.pack("!I", len(b)) + b


def refused(port: int, first: bytes) -> bool:
    """Connect, send ``first``, then: True when the server closed the connection without sending
    a single byte."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        try:
            s.sendall(first)
            return s.recv(1024) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def server():
    token = "ab" * 32
    srv = AuthStoreServer(LOOPBACK, token)
    yield srv, token
    srv.close()


def test_the_store_refuses_clients_without_the_token(server):
    srv, token = server
    wrong = "cd" * 32
    assert refused(srv.port, frame(wrong.encode()))
    assert refused(srv.port, frame(b""))  # no token
    assert refused(srv.port, frame(b"set") + frame(b"k") + frame(b"evil"))  # an op instead of the token
    assert refused(srv.port, struct.pack("!I", 1 << 30))  # an oversized first frame
    assert refused(srv.port, frame(token.encode()[:-1]))  # a prefix of the token
    with pytest.raises(ConnectionError, match="refused"):
        AuthStore(LOOPBACK, srv.port, wrong)

    # the server keeps serving the real members, and nothing the refused clients sent was stored
    store = AuthStore(LOOPBACK, srv.port, token)
    assert not store.check(["k"]) and store.num_keys() == 0
    store.set("a", b"1")
    assert store.get("a") == b"1"
    assert store.add("n", 2) == 2 and store.add("n", 3) == 5 and store.get("n") == b"5"
    assert store.compare_set("c", b"", b"x") == b"x"
    assert store.compare_set("c", b"y", b"z") == b"x"
    assert store.compare_set("c", b"x", b"z") == b"z"
    store.wait(["a", "c"])
    assert store.check(["a", "n"]) and not store.check(["a", "missing"])
    assert store.delete_key("a") and not store.delete_key("a")
    import datetime

    store.set_timeout(datetime.timedelta(milliseconds=200))
    with pytest.raises(RuntimeError, match="timed out"):
        store.get("never")
    store.close()


def test_the_store_serves_torch_through_a_prefix_store(server):
    """What torch's C++ calls (``PrefixStore`` forwards by C++ name: getNumKeys, deleteKey, clone)."""
    import torch.distributed as dist

    srv, token = server
    store = AuthStore(LOOPBACK, srv.port, token)
    p = dist.PrefixStore("weights", store)
    p.set("a", b"1")
    assert p.get("a") == b"1" and p.add("n", 4) == 4 and p.check(["a", "n"])
    assert p.num_keys() == 2 and p.delete_key("a") and p.num_keys() == 1
    c = p.clone()
    c.set("b", b"2")
    assert p.get("b") == b"2" and store.get("weights/b") == b"2"
    store.close()


def test_the_store_binds_loopback_for_single_node_use():
    assert bind_host([]) == LOOPBACK  # every member on this node (no other node reported)
    assert bind_host([node_ip(), LOOPBACK]) == LOOPBACK
    assert bind_host([node_ip(), "10.255.1.2"]) == node_ip()  # another node: this node's address only
    for everywhere in ("0.0.0.0", "", "::"):
        with pytest.raises(ValueError):
            AuthStoreServer(everywhere, "t")
    group = BroadcastGroup()
    host, port, token = group.open(world_size=2)
    try:
        assert host == LOOPBACK and len(token) == 64 and int(token, 16) >= 0  # secrets.token_hex(32)
        other = BroadcastGroup()  # a fresh group draws a fresh token
        assert other.open(2)[2] != token
        other.close()
        psutil = pytest.importorskip("psutil")
        listening = [c.laddr for c in psutil.Process().net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert [a.ip for a in listening] == [LOOPBACK]
    finally:
        group.close()


MEMBER = textwrap.dedent("""
    import json, sys
    from rl.weight_broadcast import BroadcastGroup
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    g = BroadcastGroup()
    g.join(host, port, token, 1, 2, "gloo")
    items = g.receive()
    print(json.dumps([[n, str(t.dtype), t.tolist()] for n, t in items]), flush=True)
    g.close()
""")


def test_a_two_member_gloo_broadcast_through_the_authenticated_store():
    group = BroadcastGroup()
    host, port, token = group.open(world_size=2)
    member = subprocess.Popen([sys.executable, "-c", MEMBER, host, str(port), token], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert refused(port, frame(b"0" * 64))  # an intruder meanwhile: refused, the group unharmed
        group.join(host, port, token, 0, 2, "gloo")
        sd = {"b.weight": torch.randn(3, 4), "a.bias": torch.arange(5, dtype=torch.int64),
              "c.half": torch.randn(2, 2).to(torch.bfloat16)}
        group.send(sd)
        out, err = member.communicate(timeout=60)
        assert member.returncode == 0, err
        got = json.loads(out.strip().splitlines()[-1])
        assert [n for n, _, _ in got] == sorted(sd)
        for name, dtype, values in got:
            assert dtype == str(sd[name].dtype)
            assert torch.equal(torch.tensor(values, dtype=sd[name].dtype), sd[name])

        # what the receivers read from the store: JSON, not a pickle
        raw = group.store.get("specs/1")
        assert not raw.startswith(b"\x80")  # a pickle's protocol opcode
        assert json.loads(raw) == [[k, list(sd[k].shape), str(sd[k].dtype).removeprefix("torch.")] for k in sorted(sd)]
    finally:
        if member.poll() is None:
            member.kill()
        group.close()


def test_the_weight_broadcast_module_carries_no_pickle():
    src = (ROOT / "rl" / "weight_broadcast.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "cloudpickle", "dill", "marshal", "shelve"}
    assert "TCPStore(" not in src  # the unauthenticated store is gone
    assert not re.search(r"bind\(\(\s*[\"'](0\.0\.0\.0)?[\"']", src)  # no bind to every interface


def tracked_python_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / n for n in names.split() if (ROOT / n).exists()] + [Path(__file__)]


def test_no_unsafe_loads_in_tracked_code():
    unsafe = re.compile(r"weights_only\s*=\s*False")
    hits = [str(p.relative_to(ROOT)) for p in tracked_python_files() if unsafe.search(p.read_text(errors="replace"))]
    assert hits == []
    pickle_use = re.compile(r"^\s*(import|from)\s+(pickle|cloudpickle|dill)\b|\bpickle\.loads?\(", re.M)
    library = [p for p in tracked_python_files() if p.relative_to(ROOT).parts[0] not in ("tests", ".venv")]
    users = [str(p.relative_to(ROOT)) for p in library if pickle_use.search(p.read_text(errors="replace"))]
    # the one use: a restricted Unpickler for torch's checkpoint .metadata, which refuses other globals
    assert users == ["models/fsdp.py"]
    assert "def find_class" in (ROOT / "models" / "fsdp.py").read_text()


def test_a_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    import random

    import numpy as np

    from training.checkpoint import load_model_state, save_model_state
    from training.optim import build_scheduler

    def model_and_optim():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return m, opt, build_scheduler(opt, 20, 0.1)

    model, opt, sched = model_and_optim()
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_model_state(tmp_path / "ck", model, opt, sched)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for f in ("scheduler.pt", "rng_rank0.pt"):
        torch.load(tmp_path / "ck" / f, weights_only=True)  # plain types only

    model2, opt2, sched2 = model_and_optim()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_model_state(tmp_path / "ck", model2, opt2, sched2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_the_rl_driver_state_round_trips_with_weights_only(tmp_path):
    """``RLTrainer.save_checkpoint`` / ``resume`` on a stand-in trainer: the async ``pending``
    rollouts, the KL controller and the reward moments come back from a weights_only load."""
    from rl.kl_controller import AdaptiveKLController
    from rl.rollout import Rollout
    from rl.running_moments import RunningMoments
    from rl.trainer import DRIVER_STATE, RLTrainer

    calls = []

    def call(method, path):  # the actor's ranks: save_state writes its folder, load_state reads it
        calls.append(method.__name__)
        Path(path).mkdir(parents=True, exist_ok=True)

    no_op_group = types.SimpleNamespace(call=call)

    def stand_in():
        return types.SimpleNamespace(
            cfg=types.SimpleNamespace(ckpt_path=str(tmp_path), max_ckpt_num=2),
            workers=types.SimpleNamespace(actor=no_op_group, critic=None), iteration=0,
            kl_ctl=AdaptiveKLController(0.1, 6.0, 1000), reward_moments=RunningMoments(), pending=None,
            sync_weights=lambda: calls.append("sync"), log=lambda *a: None)

    t = stand_in()
    t.iteration = 7
    t.kl_ctl.update(3.0, 64)
    t.reward_moments.update(torch.tensor([0.5, -1.0, 2.0]))
    groups = [[Rollout([1, 2], [3, 4], [-0.1, -0.25], "stop"), Rollout([1, 2], [5], None, "length")]]
    greedy = [Rollout([1, 2], [6, 7], [-0.5, -0.75], "stop")]
    t.pending = (groups, greedy, 1.25)
    RLTrainer.save_checkpoint(t)
    state = torch.load(tmp_path / "iter_000007" / DRIVER_STATE, weights_only=True)
    assert state["iteration"] == 7

    r = stand_in()
    assert RLTrainer.resume(r)
    assert r.iteration == 7 and r.pending == (groups, greedy, 1.25)
    assert r.kl_ctl.value == t.kl_ctl.value
    assert r.reward_moments.state_dict() == t.reward_moments.state_dict()
    assert calls == ["save_state", "load_state", "sync"]


def test_a_sharded_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    """torch's own reader unpickles ``.metadata`` freely; ours builds only checkpoint classes."""
    import pickle

    from models.fsdp import SafeFileSystemReader

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="has no place in a checkpoint's .metadata"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not (tmp_path / "pwned").exists()
