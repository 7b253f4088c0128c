"""The node agent over real sockets, and peer measurement against it (manual peers, loopback only).

mDNS is not used here: these tests run in the machine's own network namespace,
where a multicast query would leave the machine. tests/test_netns.py covers
discovery between two namespaces.
"""
from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inventory import __version__
from inventory.detect import Found, peers
from inventory.profile import CPU, GPU, Memory, Profile, parse
from inventory.protocol import MAX_TRANSFER
from tests.conftest import REPO
from tiers.tier3.agent import Agent, AgentError, PortInUse, start_in_thread
from tiers.tier3.net import free_port


def _profile() -> Profile:
    return Profile(name="testnode",
                   cpu=CPU(model="Test CPU 9000", architecture="x86_64", physical_cores=2, threads=4),
                   memory=Memory(total_bytes=8 << 30, available_bytes=4 << 30),
                   gpus=[GPU(vendor="nvidia", model="RTX Test", memory_bytes=16 << 30)])


@pytest.fixture
def agent():
    a = start_in_thread("127.0.0.1", 0, _profile(), "testnode", advertise=False)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def conn(agent):
    c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    yield c
    c.close()


def _get(c: http.client.HTTPConnection, path: str) -> tuple[int, str, bytes]:
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.getheader("Content-Type", ""), r.read()


# ---------------------------------------------------------------- endpoints

def test_ping(conn):
    status, ctype, body = _get(conn, "/v1/ping")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"ok": True, "name": "testnode", "version": __version__}


def test_profile_and_summary(conn):
    status, _, body = _get(conn, "/v1/profile")
    data = json.loads(body)
    assert status == 200
    # The served profile is a valid profile as it stands.
    assert parse(data["profile"]).cpu.model == "Test CPU 9000"
    s = data["summary"]
    assert s["name"] == "testnode" and s["cpu"] == "Test CPU 9000" and s["threads"] == 4
    assert s["memory_total_bytes"] == 8 << 30 and s["memory_available_bytes"] > 0
    assert s["gpus"] == [{"model": "RTX Test", "backend": "none", "memory_bytes": 16 << 30,
                          "memory_free_bytes": None, "unified_memory": False}]
    assert s["boards"] == 0


@pytest.mark.parametrize("n", [0, 1, 12345, (1 << 20) + 7, 5 << 20])
def test_bandwidth_get_exact_bytes(conn, n):
    status, ctype, body = _get(conn, f"/v1/bandwidth?bytes={n}")
    assert status == 200 and ctype == "application/octet-stream"
    assert len(body) == n


def test_keep_alive_survives_many_requests(conn):
    # RTT is measured over one connection: it must stay open across requests.
    for _ in range(3):
        assert _get(conn, "/v1/ping")[0] == 200
        assert len(_get(conn, "/v1/bandwidth?bytes=1000")[2]) == 1000
    assert _get(conn, "/v1/bandwidth?bytes=x")[0] == 400
    assert _get(conn, "/v1/ping")[0] == 200


def test_bandwidth_post(conn):
    body = b"\xab" * (3 << 20)
    conn.request("POST", "/v1/bandwidth", body=body)
    r = conn.getresponse()
    data = json.loads(r.read())
    assert r.status == 200 and data["bytes"] == len(body) and data["seconds"] >= 0


@pytest.mark.parametrize("query", ["", "?bytes=", "?bytes=-1", "?bytes=abc", "?bytes=1.5", "?bytes=1&bytes=2",
                                   f"?bytes={MAX_TRANSFER + 1}", "?bytes=%ff%00", "?=&&="])
def test_bandwidth_bad_bytes_is_400_json(conn, query):
    status, ctype, body = _get(conn, "/v1/bandwidth" + query)
    assert status == 400 and ctype == "application/json"
    data = json.loads(body)
    assert data["ok"] is False and "bytes" in data["error"]


def test_post_needs_content_length(agent):
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(b"POST /v1/bandwidth HTTP/1.1\r\nHost: x\r\n\r\n")
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 411") and "application/json" in head


def test_post_too_large_is_refused(conn):
    conn.putrequest("POST", "/v1/bandwidth")
    conn.putheader("Content-Length", str(MAX_TRANSFER + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/pong", "/v1/ping/extra", "/../etc/passwd"])
def test_unknown_path_is_404_json(conn, path):
    status, ctype, body = _get(conn, path)
    assert status == 404 and ctype == "application/json" and json.loads(body)["ok"] is False


def test_wrong_method_is_405_json(conn):
    conn.request("DELETE", "/v1/ping")
    r = conn.getresponse()
    assert r.status == 405 and r.getheader("Allow") == "GET" and json.loads(r.read())["ok"] is False


@pytest.mark.parametrize("raw", [b"GARBAGE / HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"nonsense\r\n\r\n",
                                 b"GET /v1/ping HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n"])
def test_malformed_requests_get_json_errors_not_tracebacks(agent, raw):
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] in (b"400", b"431", b"501", b"505"), head
    assert json.loads(body)["ok"] is False
    assert b"Traceback" not in reply
    # The agent still answers afterwards.
    c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    assert _get(c, "/v1/ping")[0] == 200
    c.close()


def test_stop_closes_open_connections():
    a = start_in_thread("127.0.0.1", 0, _profile(), "stopme", advertise=False)
    c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
    assert _get(c, "/v1/ping")[0] == 200
    a.stop()
    with pytest.raises((OSError, http.client.HTTPException)):
        _get(c, "/v1/ping")
    c.close()


# ---------------------------------------------------------------- start-up errors

def test_port_in_use_is_a_clear_error(agent):
    with pytest.raises(PortInUse) as err:
        Agent("127.0.0.1", agent.port, _profile(), "second", advertise=False)
    assert str(err.value) == f"port {agent.port} on 127.0.0.1 is in use: pass --port"


@pytest.mark.parametrize("kwargs, needle", [
    ({"host": "10.255.255.254"}, "not an address of this machine"),
    ({"host": "::1"}, "IPv4 only"),
    ({"name": "bad.name"}, "--name"),
    ({"name": ""}, "--name"),
    ({"port": 70000}, "--port"),
])
def test_bad_settings_are_one_line_errors(kwargs, needle):
    args = {"host": "127.0.0.1", "port": 0, "name": "ok"}
    args.update(kwargs)
    with pytest.raises(AgentError) as err:
        Agent(args["host"], args["port"], _profile(), args["name"], advertise=False)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_agent_command_port_in_use_prints_one_line(agent, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tiers.cli", "agent", "--host", "127.0.0.1",
                           "--port", str(agent.port), "--no-mdns"],
                          check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"TIERKIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"tierkit agent: port {agent.port} on 127.0.0.1 is in use: pass --port"
    assert not list(tmp_path.rglob("agent.token"))   # no new token that nobody was shown


def test_agent_command_serves_and_stops_on_sigterm(tmp_path):
    """The real process: quick-probes a profile, serves it, exits 0 on SIGTERM."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tiers.cli", "agent", "--host", "127.0.0.1", "--port", str(port),
                             "--name", "proc", "--no-mdns", "--verbose"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={"TIERKIT_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    try:
        summary = _wait_for_summary(port, proc)
        assert summary["name"] == "proc" and summary["threads"] >= 1 and summary["memory_total_bytes"] > 0
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "GET /v1/profile 200" in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_summary(port: int, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                status, _, body = _get(c, "/v1/profile")
            finally:
                c.close()
            if status == 200:
                return json.loads(body)["summary"]
        except OSError:
            time.sleep(0.05)
    raise AssertionError("agent did not come up within 30 s")


# ---------------------------------------------------------------- peers.detect against it

def test_detect_manual_peer_measures_rtt_and_bandwidth(agent):
    t = time.perf_counter()
    found = peers.detect(manual=[f"127.0.0.1:{agent.port}"], mdns_wait=0, measure_bytes=4 << 20)
    took = time.perf_counter() - t
    assert isinstance(found, Found)
    [p] = found.value
    assert p.problem is None, p.problem
    assert (p.name, p.address, p.port, p.found_by) == ("testnode", "127.0.0.1", agent.port, "manual")
    assert p.summary["cpu"] == "Test CPU 9000" and p.summary["gpus"][0]["model"] == "RTX Test"
    assert p.rtt_ms.source == "measured" and p.rtt_ms.unit == "ms" and 0 < p.rtt_ms.value < 20
    assert "median of 5" in p.rtt_ms.method
    assert p.bandwidth_mbps.unit == "Mbit/s" and p.bandwidth_mbps.value > 100
    assert "4194304 bytes" in p.bandwidth_mbps.method and "peer to this host" in p.bandwidth_mbps.method
    assert took < 2.0


def test_detect_unreachable_manual_peer_is_a_peer_with_a_problem():
    port = free_port()
    found = peers.detect(manual=[f"127.0.0.1:{port}"], mdns_wait=0, timeout=2.0)
    [p] = found.value
    assert p.rtt_ms is None and p.bandwidth_mbps is None
    assert "connection refused" in p.problem and "tierkit agent" in p.problem
    assert "problem" in found.note


def test_detect_something_that_is_not_an_agent(tmp_path):
    """A plain HTTP server on the port: reported as 'not a tierkit agent', not a crash."""
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        [p] = peers.detect(manual=[f"127.0.0.1:{port}"], mdns_wait=0, timeout=3.0).value
        assert "not as a tierkit agent" in p.problem
    finally:
        web.terminate()
        web.wait()


@pytest.mark.parametrize("spec", ["", "nohost:notaport", "host:0", "host:99999", ":8477", "http://host:8477",
                                  "a:b:c", "[::1", "has space:1"])
def test_detect_malformed_spec_is_a_note_not_a_peer(spec):
    found = peers.detect(manual=[spec], mdns_wait=0)
    assert found.value == []
    assert "ignored peer" in found.note and "\n" not in found.note


@pytest.mark.parametrize("spec, expect", [("10.0.0.2:9000", ("10.0.0.2", 9000)), ("node-b", ("node-b", 8477)),
                                          ("[fe80::1]:81", ("fe80::1", 81)), (" host:1 ", ("host", 1))])
def test_parse_spec(spec, expect):
    assert peers.parse_spec(spec) == expect


def test_detect_mixes_good_bad_and_unreachable(agent):
    dead = free_port()
    found = peers.detect(manual=[f"127.0.0.1:{agent.port}", f"127.0.0.1:{dead}", "x:y", f"127.0.0.1:{agent.port}"],
                         mdns_wait=0, measure_bytes=1 << 20, timeout=3.0)
    by_port = {p.port: p for p in found.value}
    assert len(found.value) == 2 and set(by_port) == {agent.port, dead}  # the repeat is measured once
    assert by_port[agent.port].problem is None and by_port[dead].problem
    assert "'x:y'" in found.note


def test_detect_slow_link_times_out_to_a_problem():
    """A peer that accepts but never answers: the timeout holds and the peer says so."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        t = time.perf_counter()
        [p] = peers.detect(manual=[f"127.0.0.1:{srv.getsockname()[1]}"], mdns_wait=0, timeout=0.5).value
        took = time.perf_counter() - t
    assert "no answer" in p.problem and "within 0.5 s" in p.problem
    assert took < 1.5


# ---------------------------------------------------------------- the hand-written mDNS codec vs zeroconf

def _zeroconf_answer(*, srv: bool = True, address: bool = True) -> bytes:
    """A response as python-zeroconf (the agent's responder) builds it."""
    from zeroconf import ServiceInfo
    from zeroconf._protocol.outgoing import DNSOutgoing
    from zeroconf.const import _FLAGS_AA, _FLAGS_QR_RESPONSE

    info = ServiceInfo(peers.SERVICE_TYPE, f"Node Z.{peers.SERVICE_TYPE}", port=1234,
                       addresses=[socket.inet_aton("10.1.2.3"), socket.inet_aton("10.9.9.9")],
                       properties={"cpu": "x"}, server="tierkit-nodez.local.")
    out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA, multicast=False)
    out.add_answer_at_time(info.dns_pointer(), 0)
    out.add_additional_answer(info.dns_text())
    if srv:
        out.add_additional_answer(info.dns_service())
    if address:
        for rec in info.dns_addresses():
            out.add_additional_answer(rec)
    [packet] = out.packets()
    return packet


def test_our_query_reads_as_a_qu_ptr_question_to_zeroconf():
    from zeroconf._protocol.incoming import DNSIncoming

    msg = DNSIncoming(peers._query([(peers.SERVICE_TYPE, 12)]))
    [q] = msg.questions
    assert (q.name, q.type, q.unique, msg.is_query()) == (peers.SERVICE_TYPE, 12, True, True)
    # A follow-up keeps an instance label with a dot in it as one label.
    [q] = DNSIncoming(peers._query([(("v1.2 box", "_tierkit", "_tcp", "local"), 33)])).questions
    assert (q.name, q.type) == (f"v1.2 box.{peers.SERVICE_TYPE}", 33)


def test_zeroconf_answer_resolves_with_replying_address_first():
    seen = peers._Seen()
    seen.add(_zeroconf_answer(), source="10.9.9.9")
    assert seen.resolved() == [("Node Z", ["10.9.9.9", "10.1.2.3"], 1234)]
    assert seen.resolved() == []  # reported once


def test_partial_answers_lead_to_follow_up_questions():
    seen = peers._Seen()
    seen.add(_zeroconf_answer(srv=False, address=False), source="10.1.2.3")
    assert seen.resolved() == [] and seen.unresolved() == ["Node Z"]
    assert seen.follow_ups() == [(("node z", "_tierkit", "_tcp", "local"), 33)]
    assert seen.follow_ups() == []  # asked once
    seen.add(_zeroconf_answer(address=False), source="10.1.2.3")
    assert seen.follow_ups() == [(("tierkit-nodez", "local"), 1)]
    seen.add(_zeroconf_answer(), source="10.1.2.3")
    assert seen.resolved()[0][2] == 1234


@st.composite
def _hostile(draw) -> bytes:
    """Random bytes, or a real answer cut short with one byte flipped."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    packet = bytearray(_zeroconf_answer()[: draw(st.integers(0, 400))])
    if packet:
        packet[draw(st.integers(0, len(packet) - 1))] ^= draw(st.integers(1, 255))
    return bytes(packet)


@settings(max_examples=300, deadline=None)
@given(_hostile())
def test_hostile_packets_raise_only_what_browse_ignores(data):
    try:
        seen = peers._Seen()
        seen.add(data, source="10.0.0.1")
        seen.resolved()
        seen.follow_ups()
    except (ValueError, IndexError, struct.error):
        pass
