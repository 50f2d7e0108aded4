"""cluster.yaml passes Ray's own launcher validation, and a job submitted with `ray job submit` to a
token-auth head runs and logs its MLflow run.

The local head is started with `ray start --block` and stopped by signalling that one process (and
then any process still running under its own temp dir): `ray stop` would stop every Ray process of
this user on the machine, other people's included.
"""

import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from studies import processes_naming

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def prepared_cluster_config(config: dict) -> dict:
    """What `ray up` does to a config before it calls the cloud: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- cluster.yaml ------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_validation():
    config = prepared_cluster_config(yaml.safe_load(CLUSTER_YAML.read_text()))

    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # work scales out to the GPU workers
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1  # autoscaling from zero
    assert gpu[0]["max_workers"] <= config["max_workers"]
    # The repository is copied (without the local venv) and installed with the lock.
    assert config["file_mounts"]["~/loraleak"] == "."
    assert ".venv" in config["rsync_exclude"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-c ~/loraleak/constraints.txt" in setup and "[dlib,dp]" in setup
    # One auth mode everywhere: every `ray start` runs with token auth and the user's token is shipped.
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "~/.ray/auth_token" in config["file_mounts"]
    # MLflow: a server on the head, and every node pointed at it.
    assert any("mlflow server" in c for c in config["head_start_ray_commands"])
    assert all("MLFLOW_TRACKING_URI=http://" in c for c in starts)


def test_rays_validation_rejects_a_broken_cluster_config():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["gpu_worker"]["max_wrokers"] = 4  # a typo Ray must catch
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        prepared_cluster_config(config)
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared_cluster_config(config)


# --- a local head and `ray job submit` ------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def local_head(tmp_path):
    """A one-node Ray cluster with token auth; yields (dashboard address, env that reaches it)."""
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # The same mode and token for start and submit, set explicitly: with RAY_AUTH_MODE unset, Ray
    # 2.60 decides per process from whether ~/.ray/auth_token exists. The token lives in the
    # environment, so ~/.ray is neither read nor written.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # `python` in a job = this venv's
    # Short on purpose: Ray's unix socket paths under it must stay below 108 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    log = (tmp_path / "ray-start.log").open("w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:  # ready when the jobs API answers an authenticated request
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{(tmp_path / 'ray-start.log').read_text()}")
            if _ray(["job", "list", "--address", address], env).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail("the local Ray head did not come up within 180 s")
            time.sleep(2)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start shuts down what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for p in processes_naming(temp_dir, wait_s=30):
            p.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_and_logs_its_mlflow_run(local_head, tmp_path):
    address, env = local_head
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_name = f"smoke-{uuid.uuid4().hex[:8]}"

    # The auth is real: the same request with another token is refused.
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    refused = _ray(["job", "list", "--address", address], wrong)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()

    submitted = _ray(
        ["job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": [".git", ".venv", "runs"]}),
         "--", "python", "jobs/hello_tracking.py", "--tracking-uri", tracking_uri, "--run-name", run_name],
        env, timeout=300)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output  # `ray job submit` waits, and exits 1 when the job fails
    assert "succeeded" in output.lower(), output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("loraleak-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["task_host"] == socket.gethostname()  # the Ray task ran on this head
    assert run.data.metrics["cluster_cpus"] == 2.0  # the job saw the cluster it was submitted to
    assert run.info.run_id in output  # the job's own log reached the submitter


def test_a_job_ships_its_scripts_and_configs_not_the_models_or_results(tmp_path):
    """What `ray job submit --runtime-env runtime_env.yaml` uploads, packed by Ray's own packager."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((REPO / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    package = tmp_path / "job.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/pipeline.py" in names and "platform/loraleak/configs/zoo-synthetic.yaml" in names
    assert not any(n.startswith(("platform/loraleak/assets/", "runs/", ".venv/")) for n in names)
    assert package.stat().st_size < 5e6  # ~1.3 MB; the whole working directory is ~45 MB


# --- a command shuts down the local Ray it started, and only that one ------------------------------------------

# A command run by the real runner (loraleak.command.stage_main) whose handler joins or starts Ray as every
# stage does (connect_ray), then ends as asked; after each command, still in the same process, it reports
# which processes of the Ray instances under MARKER are left (Ray's own exit handler has not run yet).
STAND_IN = """
import json, os, sys
import psutil, ray
from loraleak.cluster import connect_ray
from loraleak.command import stage_main
from loraleak.errors import LoraleakError

marker = sys.argv[1]

def ray_processes():
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.info["pid"] != os.getpid() and any(marker in arg for arg in p.info["cmdline"] or ()):
                found.append(f"{p.info['pid']} {p.info['name']}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found

def add(sub):
    p = sub.add_parser("work")
    p.add_argument("--end", choices=["ok", "error", "interrupt"])
    def work(args):
        connect_ray()
        print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "running": ray_processes()}), flush=True)
        if args.end == "error":
            raise LoraleakError("stand-in failure")
        if args.end == "interrupt":
            raise KeyboardInterrupt
    p.set_defaults(func=work)

for end in sys.argv[2:]:
    status = stage_main(add, ["work", "--end", end])
    print(json.dumps({"end": end, "status": status, "initialized": ray.is_initialized(), "left": ray_processes()}),
          flush=True)
"""


def _run_stand_in(marker: str, ends: list[str], env: dict) -> list[dict]:
    env = {**env, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", STAND_IN, marker, *ends], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


STATUS = {"ok": 0, "error": 2, "interrupt": 130}


# Each Ray start costs ~10 s on a busy machine: the default suite ends one command well, the slow one the others
# (after an error, after Ctrl-C), two commands in one process (the second starts a Ray of its own again).
@pytest.mark.parametrize("ends", [["ok"], pytest.param(["error", "interrupt"], marks=pytest.mark.slow)])
def test_a_command_shuts_down_the_local_ray_it_started_however_it_ends(ends):
    # A Ray of its own: RAY_TMPDIR puts its session (named in every one of its processes' command lines) in a
    # fresh folder, and no `ray start` cluster of this machine is found there to join instead.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        lines = _run_stand_in(temp_dir, ends, {**env, "RAY_TMPDIR": temp_dir})
        started, ended = lines[0::2], lines[1::2]
        assert [(e["end"], e["status"]) for e in ended] == [(end, STATUS[end]) for end in ends]
        for start, end in zip(started, ended):
            assert any("raylet" in p for p in start["running"]) and any("gcs_server" in p for p in start["running"])
            assert not end["initialized"] and end["left"] == [], end  # stopped by the runner, not at exit
        assert len({s["gcs"] for s in started}) == len(ends)  # each command started (and stopped) its own
        assert processes_naming(temp_dir, wait_s=30) == []
    finally:
        for p in processes_naming(temp_dir):
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_command_leaves_a_ray_it_joined_running(tmp_path):
    gcs, client, node_manager, object_manager, metrics, agent, agent_grpc, runtime_env = _free_ports(8)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    log = (tmp_path / "ray-start.log").open("w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", "--include-dashboard=false", f"--ray-client-server-port={client}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
         f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"127.0.0.1:{gcs}"
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (tmp_path / "ray-start.log").read_text():
            assert head.poll() is None, (tmp_path / "ray-start.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not come up within 180 s"
            time.sleep(1)
        before = {p.pid for p in processes_naming(temp_dir)}
        lines = _run_stand_in(temp_dir, ["ok", "error"], {**env, "RAY_ADDRESS": address})
        assert [line["gcs"].rpartition(":")[2] for line in lines[0::2]] == [str(gcs)] * 2  # joined, not started
        assert [line["status"] for line in lines[1::2]] == [0, 2]
        after = {p.pid for p in processes_naming(temp_dir)}
        assert {p for p in before if psutil.pid_exists(p)} == before  # the head's processes all still run
        assert any("raylet" in p.name() or "gcs_server" in p.name() for p in processes_naming(temp_dir))
        assert before <= after and head.poll() is None
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for p in processes_naming(temp_dir, wait_s=30):
            p.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
