"""`deepscan serve`: a real service in its own process (real model, workers and scans; no mocks of
the pipeline), reached through both doors; its records against a local scan's; its failure
cases; its lifecycle (status, stop, SIGTERM drain, a kill mid-request)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deepscan.service.client import Door, _UnixConnection

from .test_hostile import cli
from .test_pipeline import descendants

ROOT = Path(__file__).resolve().parents[1]
SCAN = ["--clips", "4", "--workers", "1", "--backend", "torch", "--precision", "fp32"]


def start_service(tmp_path: Path, ckpt: Path, *extra, env=None) -> tuple[subprocess.Popen, Path, int | None]:
    sock = tmp_path / "s.sock"
    log = open(tmp_path / "serve.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "deepscan", "serve", "--weights", str(ckpt), "--socket", str(sock),
                             *SCAN, *map(str, extra)], stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                            env={**os.environ, "DEEPSCAN_BODY_TIMEOUT_S": "2", **(env or {})})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = (tmp_path / "serve.err").read_text()
        if "ready on" in text:
            port = None
            if "http://" in text:
                port = int(text.split("http://127.0.0.1:")[1].split()[0])
            return proc, sock, port
        if proc.poll() is not None:
            raise AssertionError(f"the service ended: {text}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the service did not become ready in 180 s")


def stop_service(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("service")
    proc, sock, port = start_service(tmp, tiny_ckpt, "--http", "0", "--max-upload", "1")
    yield proc, sock, port, tmp
    assert stop_service(proc) == 0, (tmp / "serve.err").read_text()
    assert not sock.exists()


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "deepscan", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


def records(text: str) -> list[dict]:
    out = [json.loads(line) for line in text.splitlines() if line.strip()]
    for r in out:
        r.pop("timings", None)
    return out


def post(port_or_sock, path: str, body: bytes, content_type="application/json", headers=None, timeout=120):
    conn = (_UnixConnection(str(port_or_sock), timeout) if isinstance(port_or_sock, Path)
            else http.client.HTTPConnection("127.0.0.1", port_or_sock, timeout=timeout))
    conn.request("POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_records_through_both_doors_are_a_local_scans(service, media_dir, tiny_ckpt):
    proc, sock, port, _ = service
    videos = [media_dir / "astronaut.mp4", media_dir / "no_face.mp4", media_dir / "truncated.mp4",
              media_dir / "missing.mp4"]
    local = cli("scan", *videos, "--weights", tiny_ckpt, "--json", *SCAN)
    remote = run_cli("scan", *videos, "--weights", tiny_ckpt, "--json", *SCAN, "--server", sock)
    assert "note:" not in remote.stderr, remote.stderr  # no fallback
    assert remote.returncode == local.returncode
    assert records(remote.stdout) == records(local.stdout)
    status, body = post(port, "/v1/scan", json.dumps({"paths": [str(v) for v in videos]}).encode())
    assert status == 200
    assert records(body.decode()) == records(local.stdout)
    # through DEEPSCAN_SERVER, with the table (not --json): the same exit code, no traceback
    table = run_cli("scan", *videos, "--weights", tiny_ckpt, *SCAN, env={"DEEPSCAN_SERVER": str(sock)})
    assert table.returncode == local.returncode and "Traceback" not in table.stderr
    assert "astronaut.mp4" in table.stdout


def test_a_relative_name_that_is_not_utf8_comes_back_as_given(service, media_dir, tiny_ckpt, tmp_path):
    _, sock, _, _ = service
    name = os.fsdecode(b"v\xff.mp4")
    os.link(media_dir / "astronaut.mp4", tmp_path / name)
    args = [sys.executable, "-m", "deepscan", "scan", name, "--weights", str(tiny_ckpt), "--json", *SCAN]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    local = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    remote = subprocess.run([*args, "--server", str(sock)], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert "note:" not in remote.stderr and remote.returncode == local.returncode
    assert records(remote.stdout) == records(local.stdout) and records(local.stdout)[0]["path"] == "v\\xff.mp4"
    assert "UNTRAINED" in remote.stderr and "UNTRAINED" in local.stderr  # what it says of the model, too


def test_the_socket_is_the_users_alone_and_taken_once(service, tmp_path, tiny_ckpt):
    _, sock, _, _ = service
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    again = run_cli("serve", "--weights", tiny_ckpt, "--socket", sock, *SCAN, timeout=60)
    assert again.returncode == 2 and "already listens" in again.stderr and "Traceback" not in again.stderr
    assert run_cli("serve", "--status", "--socket", sock).returncode == 0
    gone = run_cli("serve", "--status", "--socket", tmp_path / "none.sock")
    assert gone.returncode == 1 and "no deepscan service" in gone.stdout


def test_another_setting_or_a_gone_service_scans_here_after_one_notice(service, media_dir, tiny_ckpt, tmp_path):
    _, sock, _, _ = service
    video = media_dir / "astronaut.mp4"
    other = run_cli("scan", video, "--weights", tiny_ckpt, "--json", *SCAN[2:], "--clips", "3", "--server", sock)
    assert other.stderr.count("note:") == 1 and "clips 4" in other.stderr and "scanning here" in other.stderr
    assert records(other.stdout)[0]["settings"]["clips"] == 3
    gone = run_cli("scan", video, "--weights", tiny_ckpt, "--json", *SCAN, "--server", tmp_path / "none.sock")
    assert "no deepscan service" in gone.stderr and records(gone.stdout)[0]["verdict"] != "error"


def test_bad_requests_get_their_error_and_the_service_goes_on(service, media_dir):
    _, sock, port, tmp = service
    assert post(port, "/v1/scan", b"{not json")[0] == 400
    assert post(port, "/v1/scan", b'{"paths": "x"}')[0] == 400
    assert post(port, "/v1/scan", b'{"paths": [1]}')[0] == 400
    assert post(port, "/v1/shutdown", b"{}")[0] == 403  # stopped through the socket only
    big = os.urandom(1536 << 10)  # --max-upload 1 (MB)
    status, body = post(port, "/v1/scan?name=big.mp4", big, content_type="video/mp4")
    assert status == 413 and b"max-upload" in body
    # a client that stalls half-way through its body: 408 after DEEPSCAN_BODY_TIMEOUT_S (2 s here)
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/scan HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    assert b" 408 " in s.recv(4096).split(b"\r\n")[0]
    s.close()
    # garbage instead of HTTP
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"\x00\x01 hello\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 400") or True  # uvicorn answers 400 or closes
    s.close()
    # an upload: its record under its name; its temporary file gone afterwards
    status, body = post(port, "/v1/scan?name=clip.mp4", (media_dir / "astronaut.mp4").read_bytes(),
                        content_type="video/mp4")
    (rec,) = records(body.decode())
    assert status == 200 and rec["path"] == "clip.mp4" and rec["verdict"] in ("real", "fake")
    assert not list(Path("/tmp").glob("deepscan-uploads-*/upload-*"))
    assert Door(socket=str(sock)).get_json("/v1/health")[1]["open"] == 0


def test_a_hundred_clients_at_once_each_get_their_records(service, media_dir):
    _, sock, port, _ = service
    results: dict[int, tuple] = {}

    def client(k: int) -> None:
        paths = [f"/nonexistent/{k}.mp4"] + ([str(media_dir / "astronaut.mp4")] if k % 50 == 0 else [])
        try:
            results[k] = post(sock if k % 2 else port, "/v1/scan", json.dumps({"paths": paths}).encode(), timeout=300)
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            results[k] = (None, repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 100
    for k, (status, body) in results.items():
        assert status == 200, (k, body)
        got = records(body.decode())
        assert got[0]["path"] == f"/nonexistent/{k}.mp4" and got[0]["verdict"] == "error"
        assert len(got) == (2 if k % 50 == 0 else 1)
    assert Door(socket=str(sock)).get_json("/v1/health")[1]["open"] == 0


def test_a_client_that_goes_away_cancels_its_inputs_only(service, media_dir):
    _, sock, port, _ = service
    video = str(media_dir / "astronaut.mp4")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/scan", body=json.dumps({"paths": [video] * 12}).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert json.loads(resp.readline())["path"] == video
    conn.sock.close()  # gone after its first record
    conn.close()
    status, body = post(sock, "/v1/scan", json.dumps({"paths": [video]}).encode())
    assert status == 200 and len(records(body.decode())) == 1
    deadline = time.monotonic() + 60
    while Door(socket=str(sock)).get_json("/v1/health")[1]["open"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = Door(socket=str(sock)).get_json("/v1/health")[1]
    assert health["open"] == 0 and health["waiting"] == 0, health


def test_a_token_guards_the_tcp_door_and_other_hosts_need_one(tmp_path, tiny_ckpt, media_dir):
    wide = run_cli("serve", "--weights", tiny_ckpt, "--socket", tmp_path / "w.sock", "--http", "0", "--host",
                   "0.0.0.0", timeout=60)
    assert wide.returncode == 2 and "needs a token" in wide.stderr
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    proc, sock, port = start_service(tmp_path, tiny_ckpt, "--http", "0", "--token-file", token)
    try:
        assert post(port, "/v1/scan", b'{"paths": ["/x.mp4"]}')[0] == 401
        status, body = post(port, "/v1/scan", b'{"paths": ["/x.mp4"]}',
                            headers={"Authorization": "Bearer 0123456789abcdef0123"})
        assert status == 200 and records(body.decode())[0]["verdict"] == "error"
        assert post(sock, "/v1/scan", b'{"paths": ["/x.mp4"]}')[0] == 200  # the socket needs none
        url = run_cli("scan", media_dir / "missing.mp4", "--weights", tiny_ckpt, "--json", *SCAN, "--server",
                      f"http://127.0.0.1:{port}", env={"DEEPSCAN_TOKEN": "0123456789abcdef0123"})
        assert "note:" not in url.stderr and records(url.stdout)[0]["verdict"] == "error"
    finally:
        assert run_cli("serve", "--stop", "--socket", sock).returncode == 0
        assert proc.wait(60) == 0 and not sock.exists()


def test_sigterm_drains_and_a_killed_service_leaves_clear_errors(tmp_path, tiny_ckpt, media_dir):
    video = media_dir / "astronaut.mp4"
    shm = set(os.listdir("/dev/shm"))
    proc, sock, _ = start_service(tmp_path, tiny_ckpt)
    client = subprocess.Popen([sys.executable, "-m", "deepscan", "scan", *[video] * 3, "--weights", str(tiny_ckpt),
                               "--json", *SCAN, "--server", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT)
    time.sleep(1.5)  # the request is in
    proc.send_signal(signal.SIGTERM)
    out, err = client.communicate(timeout=120)
    assert proc.wait(60) == 0 and not sock.exists()
    assert [r["verdict"] in ("real", "fake") for r in records(out)] == [True] * 3, err
    assert set(os.listdir("/dev/shm")) <= shm, "a drained service left shared memory behind"
    # killed mid-request: the inputs it did not finish are error records (exit 2, or 1 when a
    # finished one was fake: exit_code's order), no traceback
    temp = tmp_path / "temp"  # an upload folder a killed service left: the next one removes it
    (temp / "deepscan-uploads-99999999999-x").mkdir(parents=True)
    (temp / "deepscan-uploads-99999999999-x" / "upload-1.video").write_bytes(b"half")
    proc, sock, _ = start_service(tmp_path, tiny_ckpt, env={"TMPDIR": str(temp)})
    left = [p.name for p in temp.glob("deepscan-uploads-*")]
    assert len(left) == 1 and left[0].startswith(f"deepscan-uploads-{proc.pid}-"), left
    tree = descendants(proc.pid)
    out_file = tmp_path / "out.jsonl"
    client = subprocess.Popen([sys.executable, "-m", "deepscan", "scan", *[video] * 20, "--weights", str(tiny_ckpt),
                               "--json", *SCAN, "--server", str(sock), "--output", str(out_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while (not out_file.exists() or not out_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    out, err = client.communicate(timeout=120)
    got = records(out)
    verdicts = {r["verdict"] for r in got}
    assert client.returncode == (1 if "fake" in verdicts else 2) and "Traceback" not in err and "recorded as errors" in err
    assert len(got) == 20 and got[0]["verdict"] in ("real", "fake") and got[-1]["verdict"] == "error"
    assert "not scanned" in got[-1]["error"] and len(records(out_file.read_text())) == 20
    time.sleep(3)
    assert not [p for p in tree if Path(f"/proc/{p}").exists()], "processes of the killed service remain"
    assert set(os.listdir("/dev/shm")) <= shm, "a killed service left shared memory behind"
    sock.unlink(missing_ok=True)


def test_a_client_through_the_service_loads_no_model_runtime_nor_numpy(service, media_dir, tiny_ckpt):
    _, sock, _, _ = service
    code = ("import sys\nfrom deepscan.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'openvino', 'onnxruntime', 'numpy', 'PIL') if m in sys.modules), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, "scan", str(media_dir / "astronaut.mp4"), "--weights",
                        str(tiny_ckpt), "--json", *SCAN, "--server", str(sock)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr
    assert records(r.stdout)[0]["verdict"] in ("real", "fake")
