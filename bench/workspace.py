"""Workspaces: a 5,000-file / 100 MB tree sent by content, against ``tar | HTTP upload``.

    python -m bench.workspace [--files 5000] [--megabytes 100]

One agent on loopback (temporary state dir). Measured in one run, interleaved:

* baseline: ``tar -cf - -C TREE .`` piped into one chunked HTTP POST to a tiny sink
  (a separate ``python`` process, stdlib ``http.server``) that writes the body to a file.
  It neither checks nor unpacks anything, so it is a lower bound for "tar the tree and
  upload it"; it runs before and after the oxide runs and the faster of the two is kept.
* first run: ``upload_workspace`` (hash every file, ``POST /cas/missing``, the blobs in
  ``POST /cas/batch`` bodies) then ``POST /execute?wait`` of ``true`` in the workspace
  (the node builds the task directory from its cache, runs, removes it).
* a second baseline, the same work a task needs done: the sink pipes the POST body into
  ``tar -x`` (the tree unpacked on the other side, as a task would need it).
* second run: the same after rewriting one file: bytes sent and time as ratios of the
  first.
* every timed step starts after an untimed ``os.sync()``: no step pays for the writeback
  of the one before (the tree just made, the sink's tar), which the upload's one
  ``syncfs`` would otherwise wait for.
* artifacts: a task leaves a 64 MiB artifact and writes the same bytes to its output;
  ``download_artifacts`` against reading ``GET /task/{id}/output`` to the end.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import SECRET, LocalAgent, free_port, print_table
from oxide_cluster.client import Node
from oxide_cluster.workspace_client import download_artifacts, upload_workspace

MB = 1024 * 1024
SINK = """
import http.server, subprocess, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        unpack = self.path == "/unpack"
        if unpack:
            tar = subprocess.Popen(["tar", "-xf", "-", "-C", sys.argv[3]],
                                   stdin=subprocess.PIPE)
            out = tar.stdin
        else:
            out = open(sys.argv[2], "wb")
        with out:
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if not size:
                    self.rfile.readline()
                    break
                out.write(self.rfile.read(size))
                self.rfile.readline()
        if unpack:
            assert tar.wait() == 0
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def make_tree(root: Path, files: int, total: int) -> None:
    """``files`` files of random bytes (sizes spread around the mean) in 50 directories."""
    rng = random.Random(14)
    mean = total // files
    sizes = [rng.randint(mean // 2, mean * 3 // 2) for _ in range(files)]
    sizes[-1] += total - sum(sizes)
    block = os.urandom(2 * mean + abs(sizes[-1]))
    for index, size in enumerate(sizes):
        directory = root / f"d{index % 50:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        start = rng.randrange(0, len(block) - size)
        # Distinct bytes per file: the index in front, so no two files dedupe.
        (directory / f"f{index}.bin").write_bytes(index.to_bytes(4, "big")
                                                  + block[start:start + max(0, size - 4)])


def tar_upload(tree: Path, sink_port: int, path: str = "/upload") -> float:
    """Seconds for ``tar -c`` streamed into one chunked POST to the sink (``/unpack``:
    the sink pipes it into ``tar -x``)."""
    os.sync()
    started = time.perf_counter()
    tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(tree), "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    connection = http.client.HTTPConnection("127.0.0.1", sink_port, timeout=120)
    connection.request("POST", path, iter(lambda: tar.stdout.read(MB), b""),  # type: ignore[union-attr]
                       {"Content-Type": "application/x-tar"}, encode_chunked=True)
    reply = connection.getresponse()
    reply.read()
    assert reply.status == 204 and tar.wait() == 0
    connection.close()
    return time.perf_counter() - started


def oxide_run(node: Node, tree: Path) -> tuple[float, int, int, dict[str, Any]]:
    """(seconds, bytes sent, blobs sent, the task) for upload-and-run of ``true``."""
    os.sync()
    started = time.perf_counter()
    sent = upload_workspace(node, tree)
    task = node.request("POST", "/execute?wait=300",
                        {"command": "true", "workspace": sent.digest}, timeout=330)
    elapsed = time.perf_counter() - started
    assert task["state"] == "succeeded", task
    return elapsed, sent.uploaded_bytes, sent.uploaded_blobs, task


def read_output(node: Node, task_id: str) -> int:
    received, offset = 0, 0
    while True:
        data, headers = node.raw("GET", f"/task/{task_id}/output?offset={offset}")
        received += len(data)
        next_offset = int(headers.get("X-Next-Offset") or headers.get("x-next-offset") or 0)
        if not data or next_offset == offset:
            return received
        offset = next_offset


def measure(files: int, megabytes: int, home: Path) -> dict[str, Any]:
    home.mkdir(parents=True, exist_ok=True)
    tree = home / "tree"
    make_tree(tree, files, megabytes * MB)
    sink_port = free_port()
    (home / "unpacked").mkdir()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port),
                             str(home / "sink.tar"), str(home / "unpacked")])
    artifact_mb = 64
    figures: dict[str, Any] = {"files": files, "megabytes": megabytes}
    try:
        with LocalAgent("--output-limit", str((artifact_mb + 8) * MB)) as agent:
            node = Node(f"http://127.0.0.1:{agent.port}", SECRET, timeout=300)
            deadline = time.monotonic() + 10
            while True:
                try:
                    tar_seconds = [tar_upload(tree, sink_port)]
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            first = oxide_run(node, tree)
            changed = tree / "d07" / "f7.bin"
            changed.write_bytes(b"changed " + changed.read_bytes()[8:])
            second = oxide_run(node, tree)
            tar_seconds.append(tar_upload(tree, sink_port))
            untar_seconds = tar_upload(tree, sink_port, "/unpack")
            tar_bytes = (home / "sink.tar").stat().st_size
            # Artifacts against output: the same 64 MiB, both read after the task ended.
            script = (f"head -c {artifact_mb * MB} /dev/urandom > blob.bin && "
                      "mkdir -p out && cp blob.bin out/a.bin && cat blob.bin")
            small = upload_workspace(node, tree / "d00")
            task = node.request("POST", "/execute?wait=300", {
                "command": "sh", "args": ["-c", script], "workspace": small.digest,
                "artifacts": ["out/*.bin"]}, timeout=330)
            assert task["state"] == "succeeded", task
            started = time.perf_counter()
            written = download_artifacts(node, task["id"], home / "artifacts")
            artifact_seconds = time.perf_counter() - started
            assert written and written[0].stat().st_size == artifact_mb * MB
            started = time.perf_counter()
            output_bytes = read_output(node, task["id"])
            output_seconds = time.perf_counter() - started
            assert output_bytes == artifact_mb * MB, output_bytes
    finally:
        sink.terminate()
        sink.wait(10)
    figures.update({
        "tar_seconds": tar_seconds, "tar_bytes": tar_bytes, "untar_seconds": untar_seconds,
        "first_seconds": first[0], "first_bytes": first[1], "first_blobs": first[2],
        "second_seconds": second[0], "second_bytes": second[1], "second_blobs": second[2],
        "artifact_mib_s": artifact_mb / artifact_seconds,
        "output_mib_s": artifact_mb / output_seconds,
    })
    return figures


def rows(figures: dict[str, Any]) -> list[list[str]]:
    """Rows for ``python -m bench``'s table: section, measure, value, baseline, its value,
    ratio, goal."""
    tar = min(figures["tar_seconds"])
    first, second = figures["first_seconds"], figures["second_seconds"]
    label = f"{figures['files']} files / {figures['megabytes']} MB"
    table = [
        ["workspace", f"first upload + run `true`, {label}", f"{first:.2f} s",
         "tar | HTTP POST to a sink", f"{tar:.2f} s", f"{first / tar:.2f}", "<= 1.2"],
        ["workspace", "first upload + run (same)", f"{first:.2f} s",
         "tar | HTTP POST | tar -x", f"{figures['untar_seconds']:.2f} s",
         f"{first / figures['untar_seconds']:.2f}"],
        ["workspace", "first run bytes sent", f"{figures['first_bytes'] / MB:.1f} MiB",
         "tar stream", f"{figures['tar_bytes'] / MB:.1f} MiB",
         f"{figures['first_bytes'] / figures['tar_bytes']:.2f}"],
        ["workspace", "second run (1 file changed): bytes",
         f"{figures['second_bytes']} B ({figures['second_blobs']} blobs)",
         "first run", f"{figures['first_bytes']} B",
         f"{100 * figures['second_bytes'] / figures['first_bytes']:.3f} %", "<= 1 %"],
        ["workspace", "second run (1 file changed): time", f"{second:.2f} s",
         "first run", f"{first:.2f} s", f"{100 * second / first:.1f} %", "<= 10 %"],
        ["workspace", "artifact download, 64 MiB", f"{figures['artifact_mib_s']:.0f} MiB/s",
         "GET output, same bytes", f"{figures['output_mib_s']:.0f} MiB/s",
         f"{figures['artifact_mib_s'] / figures['output_mib_s']:.2f}"],
    ]
    return [row + ["-"] * (7 - len(row)) for row in table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--megabytes", type=int, default=100)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oxide-bench-ws-") as scratch:
        figures = measure(opts.files, opts.megabytes, Path(scratch))
    print_table("workspace", ["section", "measure", "oxide", "baseline", "baseline value",
                              "ratio", "goal"], rows(figures))


if __name__ == "__main__":
    main()
