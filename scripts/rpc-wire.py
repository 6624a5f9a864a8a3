#!/usr/bin/env python3
"""Bytes that cross the wire per decoded token with layers on RPC servers, dense and sparse.

Two `rpc-server`s on 127.0.0.1, each behind a proxy of this script that counts the bytes of
every connection in both directions; the engine puts the last -ngl layers on them. After a
prefill of --ctx tokens, --steps decode steps dense, then sparse at each --density (fixed
masks, every layer alike) and with the trained predictor if given (in the graph, as bench,
serve and sparsify run it); per step: bytes client -> server and server -> client, summed over
the servers.

    .venv/bin/python scripts/rpc-wire.py --ctx 1024 --steps 32 --json figures/rpc-wire.json
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powerinfer_attn.engine.decode import Engine  # noqa: E402
from powerinfer_attn.native import rpc  # noqa: E402
from powerinfer_attn.native.model import resolve_model  # noqa: E402


class CountingProxy:
    """Listens on 127.0.0.1:<port> and relays each connection to ``target``, counting bytes."""

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.sent = self.received = 0  # client -> server, server -> client
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, "sent"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "received"), daemon=True).start()

    def _pump(self, src, dst, counter):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self.lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> tuple[int, int]:
        with self.lock:
            out = (self.sent, self.received)
            self.sent = self.received = 0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("-ngl", type=int, default=20)
    ap.add_argument("--density", type=float, action="append", default=None)
    ap.add_argument("--predictor", default=None, help="trained:PRED.gguf[:...] (its in-graph selection)")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    densities = args.density or [0.5]
    path = resolve_model(args.model)
    procs, proxies = [], []
    rows = []
    try:
        for _ in range(2):
            proc, ep = rpc.spawn()
            procs.append(proc)
            proxies.append(CountingProxy(ep))
        eps = [p.endpoint for p in proxies]

        def run(eng, label, step):
            toks = eng.tokenize(Path(__file__).read_text() * 8)[: args.ctx + args.steps + 2]
            eng.reset()
            eng.prefill(toks[: args.ctx])
            step(eng, toks[args.ctx])  # the first step builds (and sends) its graph
            eng.rollback(args.ctx)
            for p in proxies:
                p.take()
            for i in range(args.steps):
                step(eng, toks[args.ctx + i])
            counts = [p.take() for p in proxies]
            row = {"config": label, "ctx": args.ctx, "steps": args.steps,
                   "bytes_to_servers_per_token": sum(c[0] for c in counts) / args.steps,
                   "bytes_from_servers_per_token": sum(c[1] for c in counts) / args.steps}
            rows.append(row)
            print(f"{label:>28}: {row['bytes_to_servers_per_token']:9.0f} B/token to the servers, "
                  f"{row['bytes_from_servers_per_token']:9.0f} B/token back", file=sys.stderr, flush=True)

        kw = dict(n_ctx=args.ctx + args.steps + 16, n_threads=2, n_gpu_layers=args.ngl, rpc=eps)
        with Engine(path, **kw) as eng:
            run(eng, "dense", lambda e, t: e.step(t))
            rng = np.random.default_rng(0)
            for d in densities:
                mask = (rng.random((eng.n_layer, eng.n_head)) < d).astype(np.int32)
                mask[:, 0] = 1
                eng.set_sparse(True)
                eng.set_mask(mask)
                run(eng, f"sparse, fixed masks {d:g}", lambda e, t: e.step(t))
                eng.set_sparse(False)
        if args.predictor:
            # as bench, serve and sparsify run it: in the graph, no tensor hook reading its masks
            # back (a hook splits the graph at every node it reads, and each piece travels)
            from powerinfer_attn.evaluation.bench import stack_trained

            with stack_trained(path, args.predictor, kw["n_ctx"], 2, False, True, ngl=args.ngl, rpc=eps) as eng:
                eng.set_sparse(True)
                run(eng, args.predictor + " (in the graph)", lambda e, t: e.step(t))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    doc = {"kind": "rpc-wire", "model": path.name, "n_gpu_layers": args.ngl, "servers": 2,
           "note": "two servers on 127.0.0.1 behind counting proxies", "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
