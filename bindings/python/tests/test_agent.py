"""fleet.Agent: the real agent embedded in Python, sending to a real HTTP receiver that
verifies every signature."""

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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
        # The example configures logging at INFO: the agent's own lines show on stderr.
        assert "INFO fleet.agent.agent: fleet agent started instance_id=example-001" in done.stderr
        assert SECRET not in done.stderr
        assert len(receiver.heartbeats) >= 2
        assert any(c["name"] == "job_queue" and c["ok"] for c in receiver.heartbeats[-1]["checks"])
        assert receiver.refused == 0
    finally:
        receiver.close()


def run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter, so a hang fails the test instead of pytest."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_a_check_that_never_returns_neither_hangs_stop_nor_piles_up_threads(tmp_path):
    receiver = Receiver("py-hang")
    try:
        code = f"""
import time, fleet
calls = []
def stuck():
    calls.append(1)
    time.sleep(3600)
agent = fleet.Agent(**{settings(tmp_path, receiver.url, "py-hang")!r}, check_timeout_ms="200")
agent.add_check("stuck", stuck)
with agent:
    time.sleep(1.5)
    started = time.monotonic()
print("stopped in", time.monotonic() - started, flush=True)
print("calls", len(calls), flush=True)
"""
        done = run_script(code)
        assert done.returncode == 0, done.stderr
        assert float(done.stdout.split("stopped in")[1].split()[0]) < 5
        # One call stuck for good (one thread), never one more per heartbeat.
        assert "calls 1" in done.stdout
        errors = [c["error"] for hb in receiver.heartbeats for c in hb["checks"] if c["name"] == "stuck"]
        assert "timed out after 200 ms" in errors
        assert "the previous call has not returned yet" in errors
    finally:
        receiver.close()


def test_heartbeat_now_returns_when_a_check_hangs(tmp_path):
    release = threading.Event()
    agent = fleet.Agent(**settings(tmp_path, "http://127.0.0.1:9", "py-004"), check_timeout_ms="100")
    agent.add_check("stuck", release.wait)
    try:
        result = run_in_thread(agent.heartbeat, timeout=10)
        assert {c["name"]: c for c in result["checks"]}["stuck"]["error"] == "timed out after 100 ms"
    finally:
        release.set()


def run_in_thread(function, timeout):
    out = []
    thread = threading.Thread(target=lambda: out.append(function()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function.__name__} did not return within {timeout} s"
    return out[0]


def test_a_running_agent_that_is_garbage_collected_stops_without_deadlock(tmp_path):
    code = f"""
import time, fleet
def run():
    agent = fleet.Agent(**{settings(tmp_path, "http://127.0.0.1:9", "py-005")!r})
    agent.add_check("slow", lambda: time.sleep(0.3))
    agent.start()
    time.sleep(1)
run()
print("collected", flush=True)
"""
    done = run_script(code, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "collected" in done.stdout


def test_start_raises_when_the_state_file_cannot_be_opened(tmp_path):
    (tmp_path / "a-file").write_text("")
    agent = fleet.Agent(**{**settings(tmp_path, "http://127.0.0.1:9", "py-006"), "agent_state_path": str(tmp_path / "a-file" / "state.db")})
    with pytest.raises(RuntimeError, match="state"):
        agent.start()
    assert not agent.running
    agent.stop()


def test_checks_are_refused_once_running_and_when_they_cannot_work(tmp_path):
    agent = fleet.Agent(**settings(tmp_path, "http://127.0.0.1:9", "py-007"))
    agent.add_check("mine", lambda: True)
    with pytest.raises(ValueError, match="already added"):
        agent.add_check("mine", lambda: True)
    # A name the heartbeat cannot carry would cost every heartbeat that check: refused here.
    for bad in [" ", "", "job queue", "x" * 300]:
        with pytest.raises(ValueError, match="a check name has 1 to 128 bytes and no whitespace, like `job_queue`"):
            agent.add_check(bad, lambda: True)
    with pytest.raises(ValueError, match='check name "job queue" must not contain whitespace'):
        agent.add_check("job queue")
    with pytest.raises(TypeError, match="callable, not bool"):
        agent.add_check("result_not_function", True)  # type: ignore[arg-type]

    async def coroutine_check() -> bool:
        return True

    with pytest.raises(TypeError, match="async def"):
        agent.add_check("async", coroutine_check)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        agent.add_check("decorated")(None)  # type: ignore[arg-type]
    with agent:
        # The running agent would never call it: say so instead of dropping it silently.
        with pytest.raises(RuntimeError, match="before the agent starts"):
            agent.add_check("late", lambda: True)
        with pytest.raises(RuntimeError, match="before the agent starts"):
            agent.add_check("late_decorator")
    agent.add_check("after_stop", lambda: "yes")  # type: ignore[arg-type, return-value]
    checks = {c["name"]: c for c in agent.heartbeat()["checks"]}
    assert checks["after_stop"]["error"] == "check must return None, True or False, not str"


def test_an_unknown_setting_is_a_type_error_with_a_suggestion(tmp_path):
    base = settings(tmp_path, "http://127.0.0.1:9", "py-008")
    with pytest.raises(TypeError, match='unknown setting "heartbeat_intervall".*did you mean "heartbeat_interval"'):
        fleet.Agent(**base, heartbeat_intervall="1")
    with pytest.raises(TypeError, match="no variable COMMAND_TIMEOUT"):
        fleet.Agent(**base, command_timeout="5")
    # A fallback read only when its primary is unset is still a known setting.
    fleet.Agent(**base, storage_endpoint="http://127.0.0.1:9", storage_public_url="http://127.0.0.1:9", instance_domain=None)


# --- The agent's log events, through Python's logging (logger "fleet") ---------------------

WRONG_SECRET = "not-the-secret-4f9c2a"
ADMIN_TOKEN = "admin-token-for-python-tests"
FLEET_SERVER = Path(__file__).resolve().parents[3] / "target" / "debug" / "fleet-server"


class ControlPlane:
    """The real control plane (target/debug/fleet-server, SQLite in tmp_path) on a free port,
    knowing `instance_id` by SECRET."""

    def __init__(self, tmp_path, instance_id: str):
        if not FLEET_SERVER.exists():
            pytest.fail(f"{FLEET_SERVER} is not built: run `cargo build -p fleet-server` first (scripts/test does)")
        self.instance_id = instance_id
        env = {
            **os.environ,
            "CONTROL_PLANE_DATABASE_URL": f"sqlite://{tmp_path / 'control-plane.db'}",
            "CONTROL_PLANE_ADMIN_TOKEN": ADMIN_TOKEN,
            "CONTROL_PLANE_AGENT_SECRETS": json.dumps({instance_id: SECRET}),
            "RUST_LOG": "info",
        }
        log = tmp_path / "fleet-server.log"
        with open(log, "w") as out:
            self.process = subprocess.Popen([str(FLEET_SERVER), "serve", "--listen", "127.0.0.1:0"], env=env, stdout=subprocess.DEVNULL, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"listening address=(\S+)", log.read_text())
            if found:
                self.url = f"http://{found.group(1)}"
                return
            time.sleep(0.05)
        self.close()
        raise AssertionError(f"fleet-server did not start: {log.read_text()}")

    def wait_for(self, count: int, timeout: float = 15.0) -> None:
        """Waits until the installation exists (its first heartbeat is recorded), then for
        `count` more heartbeat intervals of settings()."""
        request = urllib.request.Request(f"{self.url}/api/installations/{self.instance_id}", headers={"x-cp-admin-token": ADMIN_TOKEN})
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5):
                    break
            except urllib.error.HTTPError as err:
                assert err.code == 404 and time.monotonic() < deadline, f"no heartbeat recorded: {err}"
            time.sleep(0.05)
        time.sleep(0.2 * count)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(params=["receiver", "fleet-server"])
def control_plane(request, tmp_path):
    plane = Receiver("py-log") if request.param == "receiver" else ControlPlane(tmp_path, "py-log")
    try:
        yield plane
    finally:
        plane.close()


def wait_for_record(caplog, wanted, timeout: float = 15.0) -> logging.LogRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in list(caplog.records):
            if wanted(record):
                return record
        time.sleep(0.05)
    raise AssertionError("no such record; got:\n" + "\n".join(f"{r.levelname} {r.name} {r.getMessage()}" for r in caplog.records))


def test_a_refused_secret_is_logged_as_a_warning_that_does_not_contain_it(control_plane, tmp_path, caplog):
    # DEBUG too: no record the bridge can forward may carry the secret.
    caplog.set_level(logging.DEBUG, logger="fleet")
    agent = fleet.Agent(**{**settings(tmp_path, control_plane.url, "py-log"), "secret": WRONG_SECRET})
    with agent:
        refused = wait_for_record(caplog, lambda r: r.levelno >= logging.WARNING and "refused" in r.getMessage())
    message = refused.getMessage()
    assert refused.name == "fleet.agent.agent"
    assert "HTTP 401" in message and "AGENT_SECRET" in message and "instance_id=py-log" in message
    assert refused.threadName == "fleet-agent"
    assert refused.pathname.endswith("agent.rs") and refused.lineno > 0
    assert all(r.name.startswith("fleet.") for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    for record in caplog.records:
        assert WRONG_SECRET not in record.getMessage()
    assert WRONG_SECRET not in caplog.text


def test_a_delivered_heartbeat_logs_no_warning(control_plane, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fleet")
    with fleet.Agent(**settings(tmp_path, control_plane.url, "py-log")):
        control_plane.wait_for(3)
    started = [r for r in caplog.records if r.getMessage().startswith("fleet agent started")]
    assert len(started) == 1, caplog.text
    assert started[0].name == "fleet.agent.agent" and started[0].levelno == logging.INFO
    assert "instance_id=py-log" in started[0].getMessage() and "heartbeat_secs=0.2" in started[0].getMessage()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not any(r.levelno < logging.INFO for r in caplog.records)


def test_logging_is_silent_unless_configured_but_a_refused_secret_reaches_stderr(tmp_path):
    receiver = Receiver("py-quiet")
    try:
        code = """
import time, fleet
with fleet.Agent(**{!r}):
    time.sleep(1.5)
print("stopped", flush=True)
"""
        done = run_script(code.format(settings(tmp_path, receiver.url, "py-quiet")))
        # No handler configured: Python's last resort prints WARNING and above, nothing else.
        assert done.returncode == 0 and done.stdout == "stopped\n" and done.stderr == "", done.stderr
        assert receiver.heartbeats and receiver.refused == 0
        (tmp_path / "wrong").mkdir()
        wrong = {**settings(tmp_path / "wrong", receiver.url, "py-quiet"), "secret": WRONG_SECRET}
        done = run_script(code.format(wrong))
        assert done.returncode == 0, done.stderr
        assert receiver.refused > 0
        assert "the control plane refused this agent's signature" in done.stderr
        assert "HTTP 401" in done.stderr
        assert WRONG_SECRET not in done.stderr + done.stdout
    finally:
        receiver.close()


def test_an_event_logged_on_a_thread_that_holds_the_gil_reaches_logging(tmp_path, caplog):
    # Building the agent (in heartbeat(), holding the GIL) logs what it built, at DEBUG.
    caplog.set_level(logging.DEBUG, logger="fleet")
    agent = fleet.Agent(**settings(tmp_path, "http://127.0.0.1:9", "py-gil"))
    run_in_thread(agent.heartbeat, timeout=10)
    notes = [r for r in caplog.records if r.getMessage().startswith("agent built")]
    assert notes and notes[0].levelno == logging.DEBUG and notes[0].name == "fleet.agent.agent"
    assert "db" in notes[0].getMessage()


def test_two_agents_log_side_by_side(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fleet")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with fleet.Agent(**settings(tmp_path / "a", "http://127.0.0.1:9", "py-a")):
        with fleet.Agent(**settings(tmp_path / "b", "http://127.0.0.1:9", "py-b")):
            for instance in ("py-a", "py-b"):
                wait_for_record(caplog, lambda r: "fleet agent started" in r.getMessage() and f"instance_id={instance}" in r.getMessage())
            wait_for_record(caplog, lambda r: r.levelno == logging.WARNING and "unreachable" in r.getMessage())


def test_the_interpreter_exits_while_a_running_agent_logs(tmp_path):
    code = f"""
import atexit, logging, sys, time, fleet
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s %(message)s")
# Runs after fleet's own exit hook (registered later, by start()): the agent logs on meanwhile.
atexit.register(lambda: (time.sleep(0.5), print("slept", flush=True)))
# Never stopped: the interpreter finalizes while the agent's thread logs (DEBUG, constantly).
agent = fleet.Agent(**{{**{settings(tmp_path, "http://127.0.0.1:9", "py-exit")!r}, "heartbeat_interval": "0.01"}})
agent.start()
time.sleep(1)
print("exiting", flush=True)
"""
    done = run_script(code, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("fleet.agent.agent fleet agent started") for line in lines)
    assert any(line.startswith("fleet.sqlx.query ") for line in lines)
    # Nothing is forwarded once the interpreter is on its way out (from the exit hooks on).
    assert lines[-2:] == ["exiting", "slept"], lines[-5:]


def api(plane: "ControlPlane", path: str, body: dict | None = None) -> tuple[int, dict | str]:
    """A request to the control plane as admin: GET, or POST of `body` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{plane.url}{path}", data=data, headers={"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as err:
        text, status = err.read().decode(), err.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_until(what: str, done, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = done()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def connected(plane: "ControlPlane") -> int:
    return api(plane, "/v1/agents/connected")[1]["connected"]


def ended_target(plane: "ControlPlane", body: dict) -> dict:
    """Submits `body` to the one instance of `plane` and returns its target once it ended."""
    status, submitted = api(plane, "/v1/commands/submit", {**body, "targets": [plane.instance_id]})
    assert status == 201, submitted

    def ended():
        target = api(plane, f"/v1/commands/{submitted['id']}")[1]["targets"][0]
        return target if target["status"] not in ("queued", "sent", "running") else None

    return {**wait_until("the command to end", ended), "command_id": submitted["id"]}


def test_remote_commands_run_in_the_embedded_agent_when_enabled(tmp_path, caplog):
    # DEBUG too: the channel's credentials must not reach logging.
    caplog.set_level(logging.DEBUG, logger="fleet")
    plane = ControlPlane(tmp_path, "py-cmd")
    try:
        agent = fleet.Agent(**{**settings(tmp_path, plane.url, "py-cmd"), "heartbeat_interval": "60"}, agent_commands_enabled=True, agent_projects_dir=str(tmp_path / "projects"))
        with agent:
            wait_until("the live channel", lambda: connected(plane) == 1)
            done = ended_target(plane, {"command_type": "RunCommand", "payload": {"cmd": "printf", "args": ["%s|%s", "from python", "$(id)"]}})
            assert (done["status"], done["exit_code"]) == ("completed", 0), done
            status, output = api(plane, f"/v1/commands/{done['command_id']}/logs")
            assert (status, output) == (200, "from python|$(id)")

            # The host program owns its executable: UpdateAgent is refused, saying why.
            refused = ended_target(plane, {"command_type": "UpdateAgent", "payload": {"version": "9.9.9", "url": "https://example.invalid/agent"}})
            assert refused["status"] == "failed", refused
            assert "UpdateAgent is disabled on this agent" in refused["error"], refused
        wait_until("the channel to close", lambda: connected(plane) == 0)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "fleet.agent.channel" in {r.name for r in caplog.records}, logged
        assert SECRET not in logged and "Bearer" not in logged and "eyJ" not in logged, logged
    finally:
        plane.close()


def test_the_embedded_agent_dials_no_channel_unless_asked(tmp_path):
    plane = ControlPlane(tmp_path, "py-quiet")
    try:
        # use_env=False: AGENT_COMMANDS_ENABLED's default (true for the fleet-agent binary)
        # does not apply to a library inside a service.
        with fleet.Agent(**settings(tmp_path, plane.url, "py-quiet")):
            plane.wait_for(3)
            assert connected(plane) == 0
        with fleet.Agent(**settings(tmp_path, plane.url, "py-quiet"), agent_commands_enabled=False):
            plane.wait_for(3)
            assert connected(plane) == 0
    finally:
        plane.close()


def test_bad_command_settings_fail_at_construction_naming_the_variable(tmp_path):
    with pytest.raises(fleet.ConfigError) as raised:
        fleet.Agent(**settings(tmp_path, "http://127.0.0.1:9", "py-bad"), agent_commands_enabled="maybe", agent_commands_disabled="RunCommand,Reboot")
    message = str(raised.value)
    assert "AGENT_COMMANDS_ENABLED must be true or false" in message, message
    assert 'AGENT_COMMANDS_DISABLED: unknown command type "Reboot"' in message, message


def test_a_checks_reason_reaches_the_heartbeat_whatever_it_says(tmp_path):
    agent = fleet.Agent(**settings(tmp_path, "http://127.0.0.1:9", "py-reason"))

    @agent.add_check("coloured")
    def coloured() -> None:
        raise RuntimeError("\x1b[31mdisk full\x1b[0m\r\n" + "x" * 20_000)

    check = {c["name"]: c for c in agent.heartbeat()["checks"]}["coloured"]
    assert check["ok"] is False
    # Terminal colour codes and carriage returns would make the control plane refuse the
    # heartbeat's checks; a reason past 8 KiB too.
    assert check["error"].startswith("[31mdisk full[0m\nxxx"), check["error"][:40]
    assert len(check["error"].encode()) <= 8192 and check["error"].endswith("…")
