"""``python -m oxide_cluster.healthcheck``: exit 0 only if the local node answers ``/ready``.

Container healthchecks must really check the node (``--help`` passes on a dead server),
and ``/ready`` needs the cluster secret, so this reads the same environment as the agent:
``OXIDE_CLUSTER_SECRET`` or ``OXIDE_CLUSTER_SECRET_FILE``, and the port from
``OXIDE_LISTEN``. Standard library only, so the image needs no curl and it starts fast.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

DEFAULT_LISTEN = "tcp:4000"


def ready_url(listen: str) -> str:
    """The ``/ready`` URL of a node listening on a Twisted endpoint string."""
    parts = listen.split(":")
    scheme = "https" if parts[0] == "ssl" else "http"
    port = ""
    host = "127.0.0.1"
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "port":
            port = value
        elif sep and key == "interface" and value not in ("", "0.0.0.0", "::"):
            host = value
        elif not sep and part.isdigit() and not port:
            port = part
    if not port.isdigit():
        raise ValueError(f"cannot find a port in OXIDE_LISTEN={listen!r}")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/ready"


def read_secret(environ: Mapping[str, str]) -> str:
    """The secret as the agent resolves it: the variable first, then the file."""
    secret = environ.get("OXIDE_CLUSTER_SECRET")
    if secret:
        return secret
    path = environ.get("OXIDE_CLUSTER_SECRET_FILE")
    if path:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    raise ValueError("set OXIDE_CLUSTER_SECRET or OXIDE_CLUSTER_SECRET_FILE")


def check(environ: Mapping[str, str], timeout: float = 5.0) -> tuple[bool, str]:
    """Ask the node once; (healthy, a line saying why) for ``docker inspect``."""
    try:
        url = ready_url(environ.get("OXIDE_LISTEN") or DEFAULT_LISTEN)
        secret = read_secret(environ)
    except (OSError, ValueError) as error:
        return False, f"misconfigured: {error}"
    request = urllib.request.Request(url, headers={"X-Cluster-Secret": secret})
    # The node's own certificate is rarely issued for 127.0.0.1: this is a local probe.
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
            status = reply.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        return False, f"{url}: {error}"
    return status == 200, f"{url}: HTTP {status}"


def main() -> int:
    healthy, why = check(os.environ)
    sys.stdout.write(("ready " if healthy else "not ready ") + why + "\n")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
