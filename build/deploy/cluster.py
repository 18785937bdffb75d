"""`make cluster`: N appliances on consecutive ports behind one nginx; Ctrl-C stops them all.

    python build/deploy/cluster.py run [--replicas 2] [--port 8080] [--first-port PORT+1]
        [--host 127.0.0.1] [--engine DIR] [--config FILE] [--gpus 0,1] [--upstream HOST:PORT ...]
        [-- FLAGS]
    python build/deploy/cluster.py render --upstream HOST:PORT [...] [--listen ADDR:PORT]
        [--config FILE] [--run-dir DIR] [--out FILE] [-- FLAGS]

`run` starts each appliance as its own process (`python -m runtime serve`, own engine, 127.0.0.1,
ports first-port, first-port+1, ...; with --gpus, replica i on the i-th GPU listed), renders build/deploy/nginx.conf.template into the run
directory (build/cache/cluster-<port>/: nginx.conf, nginx.pid, access.log, temp files, and
state.json with every pid and port) and runs nginx in the foreground on --port. With --upstream
it starts no appliance and balances over the ones named (other hosts). FLAGS after `--` go to
every appliance (and set nginx's size limits when they change limits.*). A replica that dies is
reported and routed around; the launcher exits when nginx or every replica is gone.
`render` only writes the nginx config, for an nginx you run yourself.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nginx_conf                          # first: it puts the repository root on sys.path
from nginx_conf import ROOT, Upstream

from runtime import config as cfgmod
from runtime.__main__ import build_parser

SUPERVISE_INTERVAL = 0.5
RESERVED_FLAGS = ("--host", "--port", "--engine", "--config", "--replica-name")


def appliance_config(config: str | None, flags: list[str], engine: str | None) -> cfgmod.AppConfig:
    """The config every appliance will run with, read the way `python -m runtime serve` reads it."""
    bad = [f for f in flags if f.split("=", 1)[0] in RESERVED_FLAGS]
    if bad:
        raise cfgmod.ConfigError(f"{', '.join(bad)}: the cluster sets these itself "
                                 "(use --port, --first-port, --engine, --config)")
    parsed = build_parser().parse_args(["serve", *flags])
    return cfgmod.load(config, cfgmod.cli_overrides(vars(parsed)), engine=engine)


_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies (even by SIGKILL), so no
    appliance or nginx is left orphaned."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One supervised process; its output is copied to ours, each line prefixed by its name."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name, self.argv = name, argv
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent if _PRCTL else None)
        self.reported_exit = False
        self.ready = False
        threading.Thread(target=self._pump, name=f"output-{name}", daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            sys.stdout.write(f"[{self.name}] {line.decode(errors='replace')}")
            sys.stdout.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ready(upstream: Upstream) -> bool:
    try:
        with urllib.request.urlopen(upstream.url + "/ready", timeout=1.0) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _write_atomically(path: Path, text: str) -> None:
    """Readers (tests, scripts) see the whole file or none of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", flush=True)


def _stop(children: list[Child], nginx: Child, grace: float, force: threading.Event) -> None:
    """Appliances drain (SIGTERM: stop listening, finish running answers for the grace period);
    nginx quits gracefully (SIGQUIT); whatever is left after the grace period is killed."""
    for c in children:
        c.signal(signal.SIGTERM)
    nginx.signal(signal.SIGQUIT)
    deadline = time.monotonic() + grace + 10.0
    while any(c.alive() for c in [*children, nginx]) and time.monotonic() < deadline and not force.is_set():
        time.sleep(0.1)
    for c in [*children, nginx]:
        if c.alive():
            _log(f"{c.name} did not stop in time: killing it")
            c.signal(signal.SIGKILL)
            c.proc.wait(timeout=10)


def run(args: argparse.Namespace) -> int:
    nginx_bin = nginx_conf.find_nginx()
    if nginx_bin is None:
        print("nginx is not installed: `apt-get install nginx` (or `make test-setup`)", file=sys.stderr)
        return 2
    cfg = appliance_config(args.config, args.flags, args.engine)
    external = [Upstream.parse(u) for u in args.upstream]
    if args.gpus and len(args.gpus.split(",")) != args.replicas:
        raise cfgmod.ConfigError(f"--gpus {args.gpus} names {len(args.gpus.split(','))} GPU(s) "
                                 f"for {args.replicas} replica(s); give one per replica")
    first = args.first_port or args.port + 1
    upstreams = external or [Upstream("127.0.0.1", first + i) for i in range(args.replicas)]
    if not external and not cfgmod.is_local_host(args.host) and not cfg.server.api_key:
        raise cfgmod.ConfigError(f"--host {args.host} is not loopback: set server.api_key (or "
                                 f"${cfgmod.API_KEY_ENV}) so the appliances behind it require a key")
    busy = [p for p in [args.port, *([] if external else [u.port for u in upstreams])] if not _port_free(p)]
    if busy:
        raise cfgmod.ConfigError(f"port(s) {', '.join(map(str, busy))} already in use (choose --port/--first-port)")

    run_dir = Path(args.run_dir or ROOT / "build" / "cache" / f"cluster-{args.port}")
    nginx_conf.prepare_run_dir(run_dir)
    state_file = run_dir / "state.json"
    state_file.unlink(missing_ok=True)
    conf = run_dir / "nginx.conf"
    conf.write_text(nginx_conf.render(upstreams, listen=nginx_conf.listen_address(args.host, args.port),
                                      run_dir=run_dir, limits=cfg.limits, user=nginx_conf.worker_user()))
    nginx_argv = [nginx_bin, "-e", "stderr", "-p", str(run_dir), "-c", str(conf)]
    check = subprocess.run([*nginx_argv, "-t", "-q"], capture_output=True, text=True)
    if check.returncode != 0:
        print(check.stderr, file=sys.stderr)
        return 2

    stop, force = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        (force if stop.is_set() else stop).set()        # a second Ctrl-C kills at once
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    engine = ["--engine", cfg.engine]
    config = ["--config", args.config] if args.config else []
    gpus = [g for g in (args.gpus or "").split(",") if g.strip()]
    replicas = [] if external else [
        Child(f"replica {u.port}", [sys.executable, "-m", "runtime", "serve", *engine, *config,
                                    "--host", u.host, "--port", str(u.port), *args.flags],
              env={"CUDA_VISIBLE_DEVICES": gpus[i].strip()} if gpus else None)
        for i, u in enumerate(upstreams)]
    nginx = Child("nginx", nginx_argv)
    url = f"http://{nginx_conf.listen_address(args.host, args.port)}/"
    _write_atomically(state_file, json.dumps({
        "url": url, "run_dir": str(run_dir), "launcher_pid": os.getpid(),
        "nginx": {"pid": nginx.proc.pid, "port": args.port},
        "replicas": [{"url": u.url, "port": u.port, "pid": c.proc.pid} for u, c in zip(upstreams, replicas)]
                    or [{"url": u.url, "port": u.port, "pid": None} for u in upstreams]}, indent=1))
    _log(f"nginx on {url} -> {', '.join(u.address for u in upstreams)}; run directory {run_dir}")

    status, announced, waiting = 0, False, list(upstreams)
    while not stop.wait(SUPERVISE_INTERVAL):
        if not nginx.alive():
            _log(f"nginx exited ({nginx.proc.returncode}); stopping")
            status = 1
            break
        for c in replicas:
            if not c.alive() and not c.reported_exit:
                c.reported_exit = True
                left = sum(r.alive() for r in replicas)
                _log(f"{c.name} exited ({c.proc.returncode}); nginx routes around it "
                     f"({left} of {len(replicas)} left)")
        if replicas and not any(c.alive() for c in replicas):
            _log("every replica has exited; stopping")
            status = 1
            break
        waiting = [u for u in waiting if not _ready(u)]
        if not waiting and not announced:
            announced = True
            _log(f"ready: {len(upstreams)} replica(s) behind {url} (Ctrl-C stops everything)")
    _log("stopping")
    _stop(replicas, nginx, cfg.server.shutdown_grace_seconds, force)
    return status


def render_only(args: argparse.Namespace) -> int:
    cfg = appliance_config(args.config, args.flags, None)
    run_dir = Path(args.run_dir).resolve()
    text = nginx_conf.render([Upstream.parse(u) for u in args.upstream], listen=args.listen,
                             run_dir=run_dir, limits=cfg.limits, user=args.user)
    if args.out:
        nginx_conf.prepare_run_dir(run_dir)
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="cluster.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start appliances and nginx; Ctrl-C stops all")
    r.add_argument("--replicas", type=int, default=2)
    r.add_argument("--host", default="127.0.0.1", help="address nginx listens on")
    r.add_argument("--port", type=int, default=8080, help="nginx's port")
    r.add_argument("--first-port", type=int, default=None, help="first appliance's port (default PORT+1)")
    r.add_argument("--engine", default=None)
    r.add_argument("--config", default=None, help="appliance YAML, for every replica")
    r.add_argument("--upstream", action="append", default=[], metavar="HOST:PORT",
                   help="balance over running appliances instead of starting any (repeatable)")
    r.add_argument("--gpus", default=None, metavar="0,1,...",
                   help="one GPU per replica: replica i sees only GPU i of this list (CUDA_VISIBLE_DEVICES)")
    r.add_argument("--run-dir", default=None)
    w = sub.add_parser("render", help="print (or --out) an nginx config for the given appliances")
    w.add_argument("--upstream", action="append", required=True, metavar="HOST:PORT")
    w.add_argument("--listen", default="127.0.0.1:8080")
    w.add_argument("--config", default=None)
    w.add_argument("--run-dir", default=str(ROOT / "build" / "cache" / "nginx"),
                   help="where nginx keeps its pid, logs and temp files")
    w.add_argument("--user", default=None, help="user nginx's workers run as, when root starts it")
    w.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.flags = flags
    try:
        if args.cmd == "run" and args.replicas < 1:
            raise cfgmod.ConfigError("--replicas must be at least 1")
        return run(args) if args.cmd == "run" else render_only(args)
    except (cfgmod.ConfigError, ValueError) as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
