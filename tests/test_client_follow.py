"""Following a job: the SDK's Server-Sent Events reader on the stream contract (DESIGN §4,
the issue's contract 1), its resume with Last-Event-ID, and its fallback to polling."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest

from tests.api_helpers import TRAIN_ROWS, job_spec, jsonl
from tests.client_servers import Peer, Seen, sdk_deployment, send
from tuneq.client import Client
from tuneq.client.sse import ServerSentEvent, parse_events

JOB = {"id": "job-1", "object": "job", "status": "succeeded", "model": "m"}


def _event(event_id: int, kind: str = "message", message: str = "") -> dict:
    data = {"step": event_id} if kind == "metrics" else {}
    return {
        "id": event_id,
        "object": "job.event",
        "type": kind,
        "level": "info",
        "message": message or f"event {event_id}",
        "data": data,
        "created_at": 1,
    }


def _sse(event: dict) -> str:
    """One job event as the contract sends it."""
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


END = f"event: end\ndata: {json.dumps(JOB)}\n\n"


def test_the_parser_reads_every_field_of_the_format():
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "id: 7",
        "event: metrics",
        "data: first line",
        "data:second line",
        "data: ",
        "",
        "id: 8",
        "data: {}",
        ": a comment inside an event",
        "",
        "retry: soon",  # not a number: ignored
        "event: end",
        'data: {"status": "succeeded"}',
        "",
        "data: an event the stream never finished",
    ]
    assert list(parse_events(lines)) == [
        ServerSentEvent("metrics", "first line\nsecond line\n", "7", 2000),
        ServerSentEvent("message", "{}", "8", 2000),
        ServerSentEvent("end", '{"status": "succeeded"}', "8", 2000),  # no id: the last stays
    ]


class StreamPeer:
    """A server speaking the stream contract, scripted per connection: each script is a
    list of text chunks, and "DROP" cuts the connection where it stands (no final chunk)."""

    def __init__(self, *connections: list[str], polled: list[dict] | None = None) -> None:
        self.connections = list(connections)
        self.polled = polled or []
        self.peer = Peer(self.reply)

    def reply(self, handler: BaseHTTPRequestHandler, seen: Seen) -> None:
        if seen.path.startswith("/jobs/job-1/events/stream"):
            self._stream(handler)
        elif seen.path.startswith("/jobs/job-1/events"):
            after = int(seen.path.partition("after=")[2].partition("&")[0] or 0)
            data = [e for e in self.polled if e["id"] > after][:2]  # two a page
            more = len([e for e in self.polled if e["id"] > after]) > 2
            send(handler, 200, json.dumps({"data": data, "has_more": more}).encode())
        elif seen.path == "/jobs/job-1":
            send(handler, 200, json.dumps(JOB).encode())
        else:
            send(handler, 404, b"{}")

    def _stream(self, handler: BaseHTTPRequestHandler) -> None:
        script = self.connections.pop(0)
        if isinstance(script, int):  # a status instead of a stream
            send(handler, script, b'{"code": "not_found"}', content_type="application/json")
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.close_connection = True
        for chunk in script:
            if chunk == "DROP":
                handler.wfile.flush()
                return
            data = chunk.encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")


def test_a_dropped_stream_resumes_after_the_last_event_each_event_once():
    first = _sse(_event(2))
    script = StreamPeer(
        # retry first (10 ms: the test need not wait), a heartbeat, an event cut in two
        ["retry: 10\n\n", _sse(_event(1)), ": keep-alive\n\n", first[:20], first[20:], "DROP"],
        # the server resends event 2 (it should not): the reader still yields it once
        [_sse(_event(2)), _sse(_event(3, "metrics")), ": keep-alive\n\n", END],
    )
    with script.peer.running() as peer, Client(peer.url, "k") as client:
        following = client.jobs.follow("job-1")
        events = list(following)
    assert [(e.id, e.type) for e in events] == [(1, "message"), (2, "message"), (3, "metrics")]
    assert events[2].data == {"step": 3}
    assert following.job is not None and following.job.status == "succeeded"
    assert following.streamed
    streams = [s for s in peer.seen if "/stream" in s.path]
    assert [s.headers.get("last-event-id") for s in streams] == [None, "2"]
    assert all(s.headers["accept"] == "text/event-stream" for s in streams)
    assert all(s.headers["authorization"] == "Bearer k" for s in streams)


def test_following_after_an_event_asks_the_stream_for_what_came_later():
    script = StreamPeer([_sse(_event(6)), END])
    with script.peer.running() as peer, Client(peer.url, "k") as client:
        assert [e.id for e in client.jobs.follow("job-1", after=5)] == [6]
    assert peer.seen[0].headers["last-event-id"] == "5"


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param([405], id="no-stream-route"),
        pytest.param([["retry: 10\n\n", "DROP"]] * 5, id="stream-keeps-failing"),
    ],
)
def test_polling_takes_over_when_the_stream_is_refused_or_keeps_failing(stream):
    script = StreamPeer(*stream, polled=[_event(1), _event(2), _event(3)])
    with script.peer.running() as peer, Client(peer.url, "k") as client:
        following = client.jobs.follow("job-1")
        assert [e.id for e in following] == [1, 2, 3]
    assert following.job is not None and following.job.status == "succeeded"
    assert not following.streamed and script.connections == []
    polls = [s.path for s in peer.seen if "/events?" in s.path]
    assert polls[:2] == ["/jobs/job-1/events?limit=100", "/jobs/job-1/events?limit=100&after=2"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_registry_file):
    home = tmp_path_factory.mktemp("follow")
    with sdk_deployment(home, tiny_registry_file, "follow") as (url, keys):
        yield url, keys[0]


def test_follow_on_the_real_api_sees_each_event_live_then_the_ended_job(deployment, tmp_path):
    """The real stream route, read live: each event once, in order, then the ended job."""
    url, key = deployment
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(TRAIN_ROWS))
    with Client(url, key) as client:
        job = client.jobs.create(job_spec(client.files.upload(train).id))
        client.jobs.pause(job.id)  # no worker here: the queued job pauses at once
        following = client.jobs.follow(job.id)
        seen = []
        for event in following:  # steered as its events arrive
            seen.append(event.message)
            if event.message == "paused":
                client.jobs.resume(job.id)
            elif event.message.startswith("resumed"):
                client.jobs.cancel(job.id)
        assert seen[0].startswith("job created: ")
        assert seen[1:] == ["paused", "resumed; queued again", "cancelled before it ran"]
        assert following.job is not None and following.job.status == "cancelled"
        assert following.streamed  # from GET /jobs/{id}/events/stream, not polling
        listed = client.jobs.events(job.id).data
        assert [e.message for e in listed] == seen
