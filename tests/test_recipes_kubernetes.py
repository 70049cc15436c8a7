"""examples/kubernetes/deployment.yaml without a cluster.

What can be checked here is checked: the manifest's structure (probes that fit
an app, the control socket on a volume both containers mount, one uid, a
grace period above preStop + the image's drain timeout), and the reload
sidecar's own script, run by ``sh`` against a real `nodrop run` whose app
reads its config from a directory laid out as kubelet lays out a ConfigMap
volume (``..data`` -> a timestamped directory; each file a link through
``..data``; an update swaps ``..data`` with a rename). What is not: kubelet,
the probes being called, the rolling update.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, HERE, Procs, wait_for
from supervisor_harness import Start, http_get

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (test extra)")

EXAMPLES = HERE.parent / "examples"


def deployment() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "deployment.yaml").read_text()))
    assert len(docs) == 1
    assert docs[0]["kind"] == "Deployment"
    return dict(docs[0])


def containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment()["spec"]["template"]["spec"]["containers"]}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_probes_fit_an_app() -> None:
    app = containers()["app"]
    assert app["readinessProbe"]["exec"]["command"] == ["nodrop", "status"]
    assert app["startupProbe"]["exec"]["command"] == ["nodrop", "status"]
    liveness = app["livenessProbe"]["httpGet"]
    assert liveness["path"] not in ("/", ""), "GET / is a 404 on many apps: a restart loop"
    assert liveness["port"] == "http"


def test_sidecar_reaches_the_control_socket() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    app, sidecar = containers()["app"], containers()["reload-on-config-change"]
    assert env_of(app)["NODROP_CONTROL"] == env_of(sidecar)["NODROP_CONTROL"]
    control_dir = os.path.dirname(os.path.dirname(env_of(app)["NODROP_CONTROL"]))
    for c in (app, sidecar):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["control"] == control_dir
        assert mounts["config"] == "/etc/myapp"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["control"]
    assert "configMap" in volumes["config"]
    # One uid: the control socket answers only peers of its own uid.
    assert "runAsUser" in spec["securityContext"]
    assert not any("securityContext" in c for c in (app, sidecar))
    assert sidecar["image"] == app["image"]  # it needs nodrop: the app's image has it


def test_grace_period_covers_pre_stop_and_drain() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    pre_stop = containers()["app"]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    dockerfile = (EXAMPLES / "container" / "Dockerfile").read_text()
    drain = float(re.search(r'"--drain-timeout", "([\d.]+)"', dockerfile).group(1))  # type: ignore[union-attr]
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain


def configmap_volume(root: Path, files: dict[str, str], stamp: str) -> None:
    """Write ``files`` the way kubelet's atomic writer updates a ConfigMap volume."""
    data = root / f"..{stamp}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    tmp = root / "..data_tmp"
    os.symlink(data.name, tmp)
    os.replace(tmp, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            os.symlink(f"..data/{name}", root / name)


@pytest.mark.slow
def test_sidecar_script_reloads_on_a_configmap_swap(
    supervise: Start, procs: Procs, tmp_path: Path
) -> None:
    config = tmp_path / "etc-myapp"
    config.mkdir()
    configmap_volume(config, {"greeting": "hello-v1"}, "2026_01_01_00_00_00.1")
    # The app reads its config when it starts: each generation gets the files of its time.
    app = (
        f"greeting=$(cat {config}/greeting) || exit 3; "
        f'exec "$0" {shlex.quote(str(CHILDREN / "server.py"))} --tag "$greeting"'
    )
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--ready-grace", "0",
        command=["/bin/sh", "-c", app, sys.executable],
    )  # fmt: skip
    port = sup.port()
    assert "tag=hello-v1" in http_get(port)
    script = containers()["reload-on-config-change"]["command"]
    assert script[:2] == ["sh", "-c"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        NODROP_CONTROL=sup.control,
        WATCH_DIR=str(config),
        INTERVAL="0.1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    log = tmp_path / "sidecar.log"
    with open(log, "wb") as out:
        sidecar = procs.popen(script, env=env, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(0.3)  # a few idle rounds of the watcher: nothing changed, nothing reloaded
    assert sup.status()["active_generation"] == 1
    assert sidecar.poll() is None

    configmap_volume(config, {"greeting": "hello-v2"}, "2026_01_01_00_01_00.2")
    # The reload is over once it is in the history (the old generation has
    # stopped accepting); "active" flips before that.
    wait_for(
        lambda: any(r["ok"] and r["generation"] == 2 for r in sup.status()["reloads"]),
        timeout=30,
        what="the reload",
    )
    assert "tag=hello-v2" in http_get(port)
    assert "config changed" in log.read_text()

    # A config that breaks start-up: rolled back, generation 2 keeps serving.
    (config / "greeting").unlink()
    configmap_volume(config, {}, "2026_01_01_00_02_00.3")
    wait_for(lambda: "reload failed" in log.read_text(), timeout=30, what="the rollback")
    assert sup.status()["active_generation"] == 2
    assert "tag=hello-v2" in http_get(port)
    sidecar.terminate()
    sidecar.wait(timeout=10)
    assert sup.stop() == 0
