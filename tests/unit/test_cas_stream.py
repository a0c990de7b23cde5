"""A ``POST /cas/batch`` body streamed into the blob cache as it arrives (cas_http.py)."""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyChannel

from oxide_cluster.cas import BatchSink, BlobError, BlobStore, _Pipe
from oxide_cluster.cas_http import UploadRequest
from oxide_cluster.manifest import digest_bytes


def offload(function):
    return defer.maybeDeferred(function)


def blob_store(tmp_path, capacity=10_000):
    store = BlobStore(Clock(), tmp_path / "cas", capacity, offload=offload)
    store.startService()
    return store


def body(*blobs: bytes) -> bytes:
    return b"".join(f"{digest_bytes(b)} {len(b)}\n".encode() + b for b in blobs)


def outcome(deferred):
    box = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def pipe_of(data: bytes, piece: int, state: str = "end") -> _Pipe:
    pipe = _Pipe(1 << 30, lambda: None, lambda: None)
    for start in range(0, len(data), piece):
        pipe.feed(data[start:start + piece])
    pipe.close(state)
    return pipe


def test_a_streamed_batch_split_anywhere_stores_every_frame(tmp_path):
    store = blob_store(tmp_path)
    blobs = [bytes([65 + i]) * (10 * i + 1) for i in range(6)]
    for piece in (1, 7, 64, 100_000):  # headers and bytes split across chunks
        pipe = pipe_of(body(*blobs), piece)
        result = outcome(defer.Deferred.fromCoroutine(store.put_batch(pipe)))
        assert result.size == sum(map(len, blobs)), piece
    assert all(store.path(digest_bytes(b)).read_bytes() == b for b in blobs)
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []


def test_a_request_gone_before_its_body_ends_the_batch_as_aborted(tmp_path):
    store = blob_store(tmp_path)
    whole, cut = b"first", b"second blob"
    data = body(whole, cut)
    pipe = pipe_of(data[:-4], 5, state="abort")
    failure = outcome(defer.Deferred.fromCoroutine(store.put_batch(pipe)))
    failure.trap(BlobError)
    assert failure.value.code == "aborted" and "the 1 before it were kept" in str(failure.value)
    assert store.has(digest_bytes(whole)) and not store.has(digest_bytes(cut))
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []


def test_a_fast_sender_is_paused_until_the_writer_catches_up():
    calls = []
    pipe = _Pipe(40, lambda: calls.append("pause"), lambda: calls.append("resume"))
    pipe.feed(b"x" * 30)
    assert calls == []
    pipe.feed(b"y" * 20)
    pipe.feed(b"z" * 20)
    assert calls == ["pause"]
    assert bytes(pipe.read(30)) == b"x" * 30 and calls == ["pause"]  # 40 left: not yet
    assert bytes(pipe.read(35)) == b"y" * 20  # one chunk at a time
    assert calls == ["pause"]
    assert bytes(pipe.read(15)) == b"z" * 15  # 5 left, under a quarter
    assert calls == ["pause", "resume"]


def test_the_sink_answers_what_the_body_stored(tmp_path):
    store = blob_store(tmp_path)
    data = body(b"one", b"two")
    pipe = pipe_of(data, 3)
    sink = BatchSink(store, pipe, len(data))
    result = outcome(defer.Deferred.fromCoroutine(sink.finish()))
    assert (result.stored, result.present, result.size) == (2, 0, 6)
    bad = b"0" * 64 + b" 3\nabc"
    sink = BatchSink(store, pipe_of(bad, 100), len(bad))
    failure = outcome(defer.Deferred.fromCoroutine(sink.finish()))
    failure.trap(BlobError)
    assert failure.value.code == "digest_mismatch"


class Sinks:
    def __init__(self) -> None:
        self.asked: list[int] = []
        self.sink = io.BytesIO()

    def __call__(self, request, length):
        self.asked.append(length)
        return self.sink


def request_for(method: bytes, path: bytes, sinks: Sinks) -> UploadRequest:
    channel = DummyChannel()
    channel._command, channel._path = method, path
    return UploadRequest(channel, sinks=sinks)


def test_only_a_batch_post_with_a_body_is_offered_to_the_cache():
    sinks = Sinks()
    streamed = request_for(b"POST", b"/cas/batch", sinks)
    streamed.gotLength(5000)
    assert streamed.content is sinks.sink and sinks.asked == [5000]
    for method, path, length in [(b"PUT", b"/cas/" + b"a" * 64, 5000),
                                 (b"POST", b"/cas/missing", 5000),
                                 (b"POST", b"/cas/batch", 0),
                                 (b"POST", b"/cas/batchx", 5000)]:
        spooled = request_for(method, path, sinks)
        spooled.gotLength(length)
        assert spooled.content is not sinks.sink
    assert sinks.asked == [5000]
