"""Scenarios for the reuseport strategy, run *inside* a private network
namespace by :func:`nodrop.testing.netns.run_in_netns` (from the tests and from
``benchmarks/reuseport_reload.py``).

Each function starts ``python -m nodrop run --strategy reuseport`` (which,
with its workers and the load generator, inherits the namespace), observes,
stops everything it started (by pid), and returns JSON-able observations for
the caller to assert on. Waits are on events (READY=1 from the supervisor, the
control socket's answers) or polls of kernel/supervisor state with a deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodrop.load import LoadConfig, Mode, run_load
from nodrop.load.control_reloader import ControlReloader
from nodrop.supervisor.control import request
from nodrop.systemd.receiver import NotifyReceiver
from nodrop.testing.netns import in_private_netns
from nodrop.testing.waiting import wait_for

HERE = Path(__file__).parent
SERVER = [sys.executable, "-S", str(HERE / "reuseport_server.py")]  # stdlib only: no site module
DEADLINE = 20.0


def _check_netns() -> None:
    if not in_private_netns():
        raise RuntimeError("refusing to run: not in a private network namespace")


@dataclass
class Sup:
    proc: subprocess.Popen[bytes]
    control: str
    log_path: Path

    def status(self) -> dict[str, Any]:
        return request(self.control, "status", timeout=10)

    def reload(self) -> dict[str, Any]:
        return request(self.control, "reload", timeout=60)

    def listener(self, name: str) -> dict[str, Any]:
        return next(item for item in self.status()["listeners"] if item["name"] == name)

    def port(self, name: str) -> int:
        return int(self.listener(name)["address"].rsplit(":", 1)[1])

    def socket_inodes(self) -> set[int]:
        """Listening TCP and bound UDP sockets the supervisor holds: its
        /proc/PID/fd against this namespace's /proc/net/{tcp,udp} (control
        connections come and go and are left out)."""
        return self._fd_inodes() & inet_listener_inodes()

    def _fd_inodes(self) -> set[int]:
        out: set[int] = set()
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def supervised(
    tmp: Path,
    run_args: list[str],
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> Iterator[Sup]:
    """``nodrop run --strategy reuseport RUN_ARGS -- COMMAND``; ready on exit of the with."""
    _check_netns()
    control = str(tmp / "control.sock")
    log_path = tmp / "supervisor.log"
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **(env or {}))
    # --no-handoff: SERVER does not take part in connection handoff, and these
    # scenarios assert that the strategy itself gives no warning.
    argv = [
        sys.executable, "-m", "nodrop", "run", "--control", control,
        "--strategy", "reuseport", "--no-handoff",
    ]  # fmt: skip
    argv += run_args if command == [] else [*run_args, "--", *(command or SERVER)]
    with NotifyReceiver(str(tmp / "service-notify.sock")) as notify:
        full_env["NOTIFY_SOCKET"] = notify.path
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        sup = Sup(proc, control, log_path)
        try:
            deadline = time.monotonic() + DEADLINE
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([notify], [], [], left)[0]:
                    raise TimeoutError(f"supervisor not ready; log:\n{sup.log()}")
                note = notify.receive()
                if note is not None and note.fields.get("READY") == "1":
                    break
            yield sup
        finally:
            if proc.poll() is None:
                with contextlib.suppress(Exception):
                    request(control, "stop", timeout=30)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


TCP_LISTEN = 0x0A


def inet_listener_inodes() -> set[int]:
    """Inodes of listening TCP and of UDP sockets in this network namespace."""
    out: set[int] = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if name.startswith("udp") or int(fields[3], 16) == TCP_LISTEN:
                    out.add(int(fields[9]))
    return out


def http_get(port: int, timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def udp_ask(port: int, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"?", ("127.0.0.1", port))
        return s.recv(2048).decode()


def field(body: str, key: str) -> str:
    return dict(part.split("=", 1) for part in body.split())[key]


def write_config(path: Path, tag: str, listen: list[str], extra: list[str] | None = None) -> None:
    lines = [
        f"command = {json.dumps([*SERVER, '--tag', tag, *(extra or [])])}",
        f"listen = {json.dumps(listen)}",
        'strategy = "reuseport"',
        "ready_grace = 0.05",
        "drain_timeout = 3",
        "ready_timeout = 10",
    ]
    path.write_text("\n".join(lines) + "\n")


# --- scenarios -----------------------------------------------------------------


def lifecycle(tmp_dir: str) -> dict[str, Any]:
    """First generation, reload (steering), crash restart, rollback, backlog change."""
    tmp = Path(tmp_dir)
    cfg = tmp / "nodrop.toml"
    listen = ["tcp://127.0.0.1:0?name=web", "udp://127.0.0.1:0?name=dns"]
    # v1 ignores SIGTERM: it keeps accepting while it drains, so only
    # steering can explain new connections all reaching generation 2.
    write_config(cfg, "v1", listen, ["--ignore-term"])
    out: dict[str, Any] = {}
    with supervised(
        tmp, ["--config", str(cfg)], env={"NODROP_MIGRATION": "ebpf"}, command=[]
    ) as sup:
        st = sup.status()
        out["first"] = {"listeners": st["listeners"], "warnings": st["warnings"]}
        web, dns = sup.port("web"), sup.port("dns")
        gen1 = {i["name"]: i["inode"] for i in st["listeners"]}
        out["first_fds_held"] = set(gen1.values()) <= sup.socket_inodes()
        out["first_body"] = http_get(web)

        write_config(cfg, "v2", listen)
        out["reload2"] = sup.reload()
        st = sup.status()
        out["ports_after_reload"] = [sup.port("web"), sup.port("dns")] == [web, dns]
        gen2 = {i["name"]: i["inode"] for i in st["listeners"]}
        out["gen1_state_during"] = [g["state"] for g in st["generations"] if g["generation"] == 1]
        out["tcp_gens_while_gen1_alive"] = sorted({field(http_get(web), "gen") for _ in range(30)})
        out["udp_gens_while_gen1_alive"] = sorted({field(udp_ask(dns), "gen") for _ in range(20)})
        out["gen1_still_draining"] = [
            g["state"] for g in sup.status()["generations"] if g["generation"] == 1
        ]
        held = sup.socket_inodes()
        out["gen1_sockets_dropped"] = not (set(gen1.values()) & held)
        out["gen2_sockets_held"] = set(gen2.values()) <= held
        out["steered"] = [i["steered"] for i in st["listeners"]]

        # crash restart in the active generation: the new worker gets the listeners
        gen = next(g for g in st["generations"] if g["state"] == "active")
        old_pid = gen["workers"][0]["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> int | None:
            g = next(g for g in sup.status()["generations"] if g["generation"] == gen["generation"])
            w = g["workers"][0]
            return int(w["pid"]) if w["pid"] != old_pid and w["state"] == "ready" else None

        new_pid = wait_for(restarted, DEADLINE, "the crashed worker's restart")
        out["restart_served_by_new_pid"] = field(http_get(web), "pid") == str(new_pid)
        out["restart_udp_served"] = field(udp_ask(dns), "pid") == str(new_pid)

        # rollback: a broken generation 3
        before = sup.socket_inodes()
        write_config(cfg, "v3", listen, ["--exit-at-start", "3"])
        out["reload3"] = sup.reload()
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: sup.socket_inodes() == before,
                DEADLINE,
                "the failed generation's sockets to close",
            )
        out["rollback_fds_same"] = sup.socket_inodes() == before
        out["after_rollback_gen"] = field(http_get(web), "gen")
        out["after_rollback_steered"] = [i["steered"] for i in sup.status()["listeners"]]

        # a socket option change (backlog) on a port-0 spec keeps the port
        listen4 = ["tcp://127.0.0.1:0?name=web&backlog=64", "udp://127.0.0.1:0?name=dns"]
        write_config(cfg, "v4", listen4)
        out["reload4"] = sup.reload()
        out["backlog4"] = sup.listener("web")["backlog"]
        out["ports_after_backlog"] = [sup.port("web"), sup.port("dns")] == [web, dns]
        out["after_backlog_gen"] = field(http_get(web), "gen")
        out["warnings"] = sup.status()["warnings"]
    out["log"] = sup.log()[-3000:]
    return out


def under_load(
    tmp_dir: str, method: str, reloads: str, concurrency: str, duration: str, workers: str = "2"
) -> dict[str, Any]:
    """Reloads under close-mode load; ``method`` is ebpf, sysctl, none or inherit."""
    tmp = Path(tmp_dir)
    args = ["--listen", "tcp://127.0.0.1:0?name=web", "--workers", workers, "--ready-grace", "0.05"]
    env: dict[str, str] = {}
    if method == "inherit":
        args += ["--strategy", "inherit"]  # the last --strategy wins
    else:
        env["NODROP_MIGRATION"] = method
        if method == "sysctl":
            args.append("--allow-sysctl")
    with supervised(tmp, args, env=env) as sup:
        status = sup.status()
        port = sup.port("web")
        n, secs = int(reloads), float(duration)
        config = LoadConfig(
            host="127.0.0.1",
            port=port,
            mode=Mode.CLOSE,
            concurrency=int(concurrency),
            duration=secs,
            processes=None,
            reload_every=secs / (n + 1),
            reloads=n,
            timeout=5.0,
        )
        result = run_load(config, ControlReloader(sup.control))
        final = sup.status()
    return {
        "method": method,
        "listeners": status["listeners"],
        "warnings": status["warnings"],
        "strategy": status["strategy"],
        "reloads": len(result.reloads),
        "reloads_ok": sum(1 for r in result.reloads if r.ok),
        "reload_messages": [r.message for r in result.reloads if not r.ok],
        "attempts": result.attempts,
        "ok": result.ok,
        "failed": result.failed,
        "failed_per_million": result.failed_per_million,
        "outcomes": dict(result.outcomes),
        "outcomes_in_reload": dict(result.outcomes_in_reload),
        "p99_steady": result.steady.p99,
        "p99_reload": result.reload.p99,
        "active_generation": final["active_generation"],
        "log": sup.log()[-2000:],
    }


def move_listener(tmp_dir: str) -> dict[str, Any]:
    """Under load on the kept address, move the other listener to a new port
    and change the kept one's backlog."""
    tmp = Path(tmp_dir)
    cfg = tmp / "nodrop.toml"
    write_config(cfg, "v1", ["tcp://127.0.0.1:0?name=web", "tcp://127.0.0.1:18081?name=api"])
    out: dict[str, Any] = {}
    with supervised(
        tmp, ["--config", str(cfg)], env={"NODROP_MIGRATION": "ebpf"}, command=[]
    ) as sup:
        web = sup.port("web")
        out["api_before"] = field(http_get(18081), "gen")
        write_config(
            cfg, "v2", ["tcp://127.0.0.1:0?name=web&backlog=128", "tcp://127.0.0.1:18082?name=api"]
        )

        class OneReload:
            def __init__(self) -> None:
                self.inner = ControlReloader(sup.control)

            def reload(self) -> Any:
                return self.inner.reload()

        config = LoadConfig(
            host="127.0.0.1",
            port=web,
            mode=Mode.CLOSE,
            concurrency=32,
            duration=3.0,
            processes=1,
            reload_every=1.0,
            reloads=1,
            timeout=5.0,
        )
        result = run_load(config, OneReload())
        out["reload_ok"] = [r.ok for r in result.reloads]
        out["web_attempts"] = result.attempts
        out["web_failed"] = result.failed
        out["web_outcomes"] = dict(result.outcomes)
        out["web_port_kept"] = sup.port("web") == web
        out["web_backlog"] = sup.listener("web")["backlog"]
        out["api_after"] = field(http_get(18082), "gen")

        def old_api_closed() -> bool:
            try:
                http_get(18081, timeout=2)
            except ConnectionRefusedError:
                return True
            return False

        out["old_api_refused"] = wait_for(old_api_closed, DEADLINE, "the old api port to close")
    return out


def parse_wrk(text: str) -> dict[str, Any]:
    """The counts wrk prints: requests, socket errors, non-2xx, p99 (pure)."""
    import re

    out: dict[str, Any] = {"requests": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    out["non2xx"] = 0
    out["p99"] = None
    if m := re.search(r"(\d+) requests in", text):
        out["requests"] = int(m.group(1))
    if m := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        out.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non2xx"] = int(m.group(1))
    if m := re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE):
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
        out["p99"] = float(m.group(1)) * scale
    out["failed"] = out["connect"] + out["read"] + out["write"] + out["timeout"] + out["non2xx"]
    return out


def under_wrk(
    tmp_dir: str, method: str, reloads: str, concurrency: str, duration: str, workers: str = "2"
) -> dict[str, Any]:
    """The same as :func:`under_load` with ``wrk`` as an independent client
    (``Connection: close``: a new connection per request)."""
    import threading

    tmp = Path(tmp_dir)
    args = ["--listen", "tcp://127.0.0.1:0?name=web", "--workers", workers, "--ready-grace", "0.05"]
    env: dict[str, str] = {}
    if method == "inherit":
        args += ["--strategy", "inherit"]
    else:
        env["NODROP_MIGRATION"] = method
        if method == "sysctl":
            args.append("--allow-sysctl")
    n, secs = int(reloads), float(duration)
    with supervised(tmp, args, env=env) as sup:
        port = sup.port("web")
        answers: list[dict[str, Any]] = []
        stop = threading.Event()

        def reload_loop() -> None:
            # at start + every * (i + 1), like nodrop.load's runner: a slow
            # reload delays the next one, never skips it
            every, start = secs / (n + 1), time.monotonic()
            for i in range(n):
                if stop.wait(max(0.0, start + every * (i + 1) - time.monotonic())):
                    return
                answers.append(request(sup.control, "reload", wait="drained", timeout=60))

        cmd = [
            "wrk", "-t2", f"-c{concurrency}", f"-d{secs:g}s", "--latency", "--timeout", "5s",
            "-H", "Connection: close", f"http://127.0.0.1:{port}/",
        ]  # fmt: skip
        thread = threading.Thread(target=reload_loop)
        thread.start()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
        finally:
            stop.set()
            thread.join(timeout=120)
    counts = parse_wrk(proc.stdout)
    return {
        "method": method,
        **counts,
        "reloads": len(answers),
        "reloads_ok": sum(1 for a in answers if a.get("ok")),
        "stdout": proc.stdout[-1500:],
    }


def reexec_under_load(tmp_dir: str) -> dict[str, Any]:
    """`nodrop reexec` twice, then a reload, under close-mode load (eBPF)."""
    tmp = Path(tmp_dir)
    args = ["--listen", "tcp://127.0.0.1:0?name=web", "--workers", "2", "--ready-grace", "0.05"]
    with supervised(tmp, args, env={"NODROP_MIGRATION": "ebpf"}) as sup:
        before = sup.status()
        port = sup.port("web")
        config = LoadConfig(
            host="127.0.0.1", port=port, mode=Mode.CLOSE, concurrency=16, duration=4.0,
            processes=1, timeout=5.0,
        )  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(run_load, config)
            reexecs = [
                subprocess.run(
                    [sys.executable, "-m", "nodrop", "reexec", "--control", sup.control],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                for _ in range(2)
            ]
            after_reexec = sup.status()
            reload = sup.reload()
            result = load.result()
        final = sup.status()
        body = http_get(port)
    return {
        "reexec_rc": [r.returncode for r in reexecs],
        "reexec_out": [r.stdout + r.stderr for r in reexecs],
        "pid_before": before["pid"],
        "pid_after": after_reexec["pid"],
        "reexecs": after_reexec["reexecs"],
        "listeners_after_reexec": after_reexec["listeners"],
        "reload_ok": reload["ok"],
        "port_after": int(final["listeners"][0]["address"].rsplit(":", 1)[1]),
        "port": port,
        "ok": result.ok,
        "failed": result.failed,
        "outcomes": dict(result.outcomes),
        "body": body,
        "log": sup.log()[-3000:],
    }
