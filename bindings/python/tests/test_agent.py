"""fleet.Agent: the real agent embedded in Python, sending to a real HTTP receiver that
verifies every signature."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import fleet

SECRET = "py-agent-secret"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embedded_agent.py"


class Receiver:
    """A control-plane stand-in that verifies every request with fleet.Verifier and records
    the heartbeats (not the agent's requests for jobs)."""

    def __init__(self, instance_id: str):
        self.verifier = fleet.Verifier({instance_id: SECRET})
        self.heartbeats: list[dict] = []
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                try:
                    receiver.verifier.verify(body, dict(self.headers.items()))
                except fleet.InvalidSignature:
                    receiver.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path != "/api/heartbeats":
                    # The agent also asks for update, plugin and restore jobs; 204 is the
                    # control plane's answer when there is none.
                    self.send_response(204)
                    self.end_headers()
                    return
                receiver.heartbeats.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok":true}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.heartbeats) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.heartbeats) >= count, f"got {len(self.heartbeats)} heartbeats, wanted {count}"

    def close(self):
        self.server.shutdown()


def settings(tmp_path, url, instance_id):
    return dict(
        use_env=False,
        instance_id=instance_id,
        control_plane_url=url,
        secret=SECRET,
        heartbeat_interval="0.2",
        agent_port="0",
        agent_state_path=str(tmp_path / "state.db"),
        agent_metrics_url="off",
        containers_interval="0",
    )


def test_embedded_agent_sends_signed_heartbeats_with_python_checks(tmp_path):
    receiver = Receiver("py-001")
    try:
        agent = fleet.Agent(**settings(tmp_path, receiver.url, "py-001"))
        agent.add_check("always_ok", lambda: None)

        @agent.add_check("broken")
        def broken():
            raise RuntimeError("queue is stuck")

        with agent:
            assert agent.running
            receiver.wait_for(2)
        assert not agent.running
        assert receiver.refused == 0
        hb = receiver.heartbeats[-1]
        assert hb["instance_id"] == "py-001"
        checks = {c["name"]: c for c in hb["checks"]}
        assert checks["always_ok"]["ok"] is True
        assert checks["broken"]["ok"] is False
        assert "queue is stuck" in checks["broken"]["error"]
    finally:
        receiver.close()


def test_heartbeat_now_and_check_results(tmp_path):
    agent = fleet.Agent(**settings(tmp_path, "http://127.0.0.1:9", "py-002"))
    agent.add_check("false_check", lambda: False)
    hb = agent.heartbeat()
    checks = {c["name"]: c for c in hb["checks"]}
    assert checks["false_check"] == {**checks["false_check"], "ok": False, "error": "check returned False"}
    assert hb["instance_id"] == "py-002"


def test_configuration_errors_name_every_variable():
    with pytest.raises(fleet.ConfigError) as info:
        fleet.Agent(use_env=False, heartbeat_interval="soon")
    message = str(info.value)
    for name in ("INSTANCE_ID", "CONTROL_PLANE_URL", "AGENT_SECRET", "HEARTBEAT_INTERVAL"):
        assert name in message


def test_start_twice_is_refused_and_stop_is_idempotent(tmp_path):
    agent = fleet.Agent(**settings(tmp_path, "http://127.0.0.1:9", "py-003"))
    agent.start()
    try:
        with pytest.raises(RuntimeError):
            agent.start()
    finally:
        agent.stop()
    agent.stop()
    assert "py-003" in repr(agent) and SECRET not in repr(agent)


def test_the_example_service_runs(tmp_path):
    receiver = Receiver("example-001")
    try:
        env = {
            **os.environ,
            "CONTROL_PLANE_URL": receiver.url,
            "INSTANCE_ID": "example-001",
            "AGENT_SECRET": SECRET,
            "AGENT_STATE_PATH": str(tmp_path / "example.db"),
            "AGENT_METRICS_URL": "off",
            "CONTAINERS_INTERVAL": "0",
        }
        done = subprocess.run([sys.executable, str(EXAMPLE), "--seconds", "2.5"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "agent stopped" in done.stdout
        assert len(receiver.heartbeats) >= 2
        assert any(c["name"] == "job_queue" and c["ok"] for c in receiver.heartbeats[-1]["checks"])
        assert receiver.refused == 0
    finally:
        receiver.close()
