"""Render build/deploy/nginx.conf.template for a list of appliances.

The request-size limits come from the appliance config itself (the same YAML and flags the
appliances get), so nginx refuses exactly what every replica would refuse. Everything nginx
writes (pid, logs, temp files) goes under one run directory, so it runs unprivileged, in the
foreground, beside any system nginx.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:            # run as a script from build/deploy/: import the runtime
    sys.path.insert(0, str(ROOT))

from runtime.config import LimitsConfig  # noqa: E402
from runtime.server.routes_misc import MULTIPART_SLACK  # noqa: E402

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")


@dataclasses.dataclass(frozen=True)
class Upstream:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Upstream":
        """'host:port', '10.0.0.5:8080' or '[::1]:8081'."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not HOST:PORT: {text!r}")
        return cls(host.strip("[]"), int(port))

    @property
    def address(self) -> str:
        try:
            if ipaddress.ip_address(self.host).version == 6:
                return f"[{self.host}]:{self.port}"
        except ValueError:
            pass
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@dataclasses.dataclass(frozen=True)
class Balancing:
    """Failover and timeout settings (seconds); the defaults suit appliances on a LAN."""
    max_fails: int = 2                 # failures within fail_timeout that take a replica out ...
    fail_timeout: int = 10             # ... for this long
    connect_timeout: int = 2
    read_timeout: int = 3600           # between two reads from an appliance (queued or long answers)
    next_upstream_timeout: int = 60    # a request is moved on to another replica only this long


def find_nginx() -> str | None:
    for name in NGINX_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def worker_user() -> str | None:
    """nginx started by root switches its workers to `nobody`, who may not reach a private run
    directory (a temp file for an upload body then fails); so under root (a container, say) the
    workers run as the launching user, as they do whenever an ordinary user starts nginx."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwuid(os.geteuid()).pw_name


def render(upstreams: list[Upstream], *, listen: str, run_dir: Path, limits: LimitsConfig,
           balancing: Balancing = Balancing(), error_log: str = "stderr",
           user: str | None = None) -> str:
    """The config text; `user`: the workers' user (the `user` directive), None for nginx's default."""
    if not upstreams:
        raise ValueError("at least one upstream appliance is needed")
    b = balancing
    servers = "\n".join(f"        server {u.address} max_fails={b.max_fails} fail_timeout={b.fail_timeout}s;"
                        for u in upstreams)
    values = {
        "RUN_DIR": str(Path(run_dir).resolve()), "ERROR_LOG": error_log, "LISTEN": listen,
        "USER": f"user {user};" if user else "# user: nginx's default (workers run as whoever starts it)",
        "SERVERS": servers, "TRIES": str(len(upstreams)),
        "CONNECT_TIMEOUT": str(b.connect_timeout), "READ_TIMEOUT": str(b.read_timeout),
        "NEXT_UPSTREAM_TIMEOUT": str(b.next_upstream_timeout),
        "MAX_BODY_BYTES": str(limits.max_body_bytes), "MAX_UPLOAD_BYTES": str(limits.max_upload_bytes),
        "MAX_UPLOAD_BODY_BYTES": str(limits.max_upload_bytes + MULTIPART_SLACK),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise ValueError(f"unfilled placeholder in {TEMPLATE}: {text[text.index('{{'):][:40]}")
    return text


def prepare_run_dir(run_dir: Path) -> None:
    """The directories the rendered config writes into (nginx creates only the last level)."""
    (Path(run_dir) / "tmp").mkdir(parents=True, exist_ok=True)


def listen_address(host: str, port: int) -> str:
    return Upstream(host, port).address
