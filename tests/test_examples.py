"""The example infrastructure the product deploys, exercised with the real CLIs.

Packer 1.6.6 builds the local image and (against moto over HTTP) the AMI; the app and its start/stop
scripts run as real processes; Terraform 1.0.3 applies the local stack against a Consul agent API
stand-in. Nothing here uses the product's adapters: these tests pin the examples themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from icd.tools.binaries import packer_binary, terraform_binary, terraform_cli_config
from icd.tools.process import CompletedCommand, run_command
from standins.consul import ConsulStandIn
from tests.waiting import wait_until

pytestmark = pytest.mark.tools

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMESPACE = "acmeinc/web"


# --- the Consul agent (stand-in) ----------------------------------------------------------------------


def consul_get(consul_addr: str, path: str, token: str | None = None) -> dict[str, dict[str, Any]]:
    request = urllib.request.Request(f"{consul_addr}{path}")  # noqa: S310  # a loopback stand-in
    if token:
        request.add_header("X-Consul-Token", token)
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        document: dict[str, dict[str, Any]] = json.load(response)
    return document


def agent_services(consul_addr: str, token: str | None = None) -> dict[str, dict[str, Any]]:
    return consul_get(consul_addr, "/v1/agent/services", token)


def wait_for_check_status(
    consul_addr: str, check_id: str, status: str, token: str | None = None, timeout: float = 15.0
) -> None:
    def current() -> object:
        return consul_get(consul_addr, "/v1/agent/checks", token).get(check_id, {}).get("Status")

    wait_until(lambda: current() == status, timeout=timeout, message=f"check {check_id} never became {status!r}")


# --- helpers -------------------------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
            return int(response.status), json.load(response)
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.load(exc)


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    return wait_until(
        lambda: path.read_text().strip() if path.exists() else "", timeout=timeout, message=f"{path} never appeared"
    )


def kill_group_if_alive(pid_file: Path) -> None:
    """Last-resort cleanup so a failing test never leaves an app running."""
    try:
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


@dataclass(frozen=True)
class AppTree:
    root: Path

    @property
    def template_dir(self) -> Path:
        return self.root / "packer"


def packer_build(tree: AppTree, only: str, version: str, output_dir: Path, **extra_vars: str) -> CompletedCommand:
    variables = {
        "version": version,
        "commit": f"c0ffee{version}",
        "output_dir": str(output_dir),
        # Short, so the Consul stand-in's real HTTP checks settle within a test.
        "health_interval": "1s",
        **extra_vars,
    }
    argv = [packer_binary(), "build", f"-only={only}"]
    for name, value in variables.items():
        argv += ["-var", f"{name}={value}"]
    argv.append(".")
    # Packer gets only what its build needs: no credentials for a local image, test ones for moto's EC2.
    env = {"CHECKPOINT_DISABLE": "1", "PACKER_NO_COLOR": "1"}
    if only.startswith("amazon-ebs"):
        env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    return run_command(argv, cwd=tree.template_dir, env=env, timeout=120)


def manifest_last_build(tree: AppTree) -> dict[str, Any]:
    manifest = json.loads((tree.template_dir / "packer-manifest.json").read_text())
    [build] = [b for b in manifest["builds"] if b["packer_run_uuid"] == manifest["last_run_uuid"]]
    return dict(build)


@pytest.fixture(scope="module")
def app_tree(tmp_path_factory: pytest.TempPathFactory) -> AppTree:
    """A copy of examples/app, so builds never write manifests or images into the repository."""
    root = tmp_path_factory.mktemp("app") / "app"
    shutil.copytree(EXAMPLES / "app", root, ignore=shutil.ignore_patterns("packer-manifest.json", "output"))
    return AppTree(root)


@pytest.fixture(scope="module")
def images(app_tree: AppTree, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    output_dir = tmp_path_factory.mktemp("images")
    built = {}
    for version in ("1.0.0", "2.0.0"):
        result = packer_build(app_tree, "null.local_image", version, output_dir)
        assert result.returncode == 0, result.stderr + result.stdout
        built[version] = output_dir / f"web-{version}.tar.gz"
    return built


def unpack(image: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    with tarfile.open(image) as tar:
        tar.extractall(into, filter="data")
    return into


# --- Packer --------------------------------------------------------------------------------------------


def test_local_image_bakes_app_release_and_consul_definition(images: dict[str, Path]) -> None:
    with tarfile.open(images["1.0.0"]) as tar:
        names = set(tar.getnames())
        release = json.load(tar.extractfile("release.json"))  # type: ignore[arg-type]
        service = json.load(tar.extractfile("consul/service.json"))  # type: ignore[arg-type]
        start_mode = tar.getmember("bin/start").mode

    assert {"app/app.py", "release.json", "consul/service.json", "bin/start", "bin/stop"} <= names
    assert start_mode & 0o111
    assert release["namespace"] == NAMESPACE
    assert release["version"] == "1.0.0"
    assert release["commit"] == "c0ffee1.0.0"
    assert release["built_at"]
    assert service["Name"] == "web"
    assert service["Meta"] == {"artifact_version": "1.0.0", "commit": "c0ffee1.0.0", "namespace": NAMESPACE}
    assert service["Check"]["HTTP"].endswith("/health")
    assert service["Check"]["Interval"] == "1s"
    assert service["Check"]["Timeout"] == "2s"


def test_manifest_records_the_image_and_a_rebuild_replaces_it(app_tree: AppTree, tmp_path: Path) -> None:
    first = packer_build(app_tree, "null.local_image", "3.1.4", tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    image = tmp_path / "web-3.1.4.tar.gz"
    build = manifest_last_build(app_tree)
    assert build["builder_type"] == "null"
    assert build["custom_data"]["image_path"] == str(image)
    assert build["custom_data"]["version"] == "3.1.4"
    assert [f["name"] for f in build["files"]] == [str(image)]
    first_run = build["packer_run_uuid"]

    second = packer_build(app_tree, "null.local_image", "3.1.4", tmp_path)

    assert second.returncode == 0, second.stderr + second.stdout
    assert manifest_last_build(app_tree)["packer_run_uuid"] != first_run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web-3.1.4.tar.gz"]  # no partial files left
    with tarfile.open(image) as tar:
        assert json.load(tar.extractfile("release.json"))["version"] == "3.1.4"  # type: ignore[arg-type]


def test_whole_template_validates_including_the_real_ami_source(app_tree: AppTree) -> None:
    argv = [packer_binary(), "validate", "-var", "version=1.0.0", "-var", "commit=abc", "."]
    result = run_command(argv, cwd=app_tree.template_dir, env={"CHECKPOINT_DISABLE": "1"}, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


def test_unsafe_version_is_refused(app_tree: AppTree, tmp_path: Path) -> None:
    result = packer_build(app_tree, "null.local_image", "../escape", tmp_path / "out")

    assert result.returncode != 0
    assert "must match" in result.stdout + result.stderr
    assert not (tmp_path / "escape.tar.gz").exists()


@pytest.mark.parametrize(
    "hostile",
    [
        "x'; touch {marker}; echo '",
        'x"; touch {marker}; echo "',
        "$(touch {marker})",
        "`touch {marker}`",
        "x\ntouch {marker}",
    ],
)
def test_a_hostile_value_is_data_never_code(app_tree: AppTree, tmp_path: Path, hostile: str) -> None:
    marker = tmp_path / "pwned"
    result = packer_build(
        app_tree, "null.local_image", "1.0.0", tmp_path / "out", service_name=hostile.format(marker=marker)
    )

    assert not marker.exists(), "a variable's value ran as a shell command"
    assert result.returncode != 0
    assert "must match" in result.stdout + result.stderr  # refused as a name, by the image's own check


def test_ami_build_against_moto_is_tagged(app_tree: AppTree, moto_endpoint: str, tmp_path: Path) -> None:
    result = packer_build(app_tree, "amazon-ebs.ami", "1.2.0", tmp_path, ec2_endpoint=moto_endpoint)

    assert result.returncode == 0, result.stderr + result.stdout
    build = manifest_last_build(app_tree)
    region, ami_id = build["artifact_id"].split(":")
    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint, region_name=region)
    [image] = ec2.describe_images(ImageIds=[ami_id])["Images"]
    tags = {tag["Key"]: tag["Value"] for tag in image["Tags"]}
    assert tags["namespace"] == NAMESPACE
    assert tags["version"] == "1.2.0"
    assert tags["commit"] == "c0ffee1.2.0"


# --- the app and its start/stop scripts ----------------------------------------------------------------


def test_app_health_flips_to_500_while_the_unhealthy_file_exists(images: dict[str, Path], tmp_path: Path) -> None:
    instance = unpack(images["1.0.0"], tmp_path / "instance")
    proc = subprocess.Popen(
        [sys.executable, str(instance / "app" / "app.py"), "--port", "0", "--instance-dir", str(instance)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{int(wait_for_file(instance / 'app.port'))}"
        assert http_get(f"{base}/") == (200, {"name": NAMESPACE, "version": "1.0.0"})
        assert http_get(f"{base}/health") == (
            200,
            {"status": "ok", "version": "1.0.0", "commit": "c0ffee1.0.0"},
        )

        (instance / "unhealthy").touch()
        status, body = http_get(f"{base}/health")
        assert (status, body["status"]) == (500, "unhealthy")

        (instance / "unhealthy").unlink()
        assert http_get(f"{base}/health")[0] == 200
    finally:
        proc.kill()
        proc.wait()


def test_start_registers_and_stop_deregisters_idempotently(images: dict[str, Path], tmp_path: Path) -> None:
    token = "s3cret-token"
    instance = unpack(images["1.0.0"], tmp_path / "web-1.0.0")
    env = {**os.environ, "CONSUL_HTTP_TOKEN": token}
    start = [str(instance / "bin" / "start"), "--instance-dir", str(instance)]
    stop = [str(instance / "bin" / "stop"), "--instance-dir", str(instance)]
    with ConsulStandIn(acl_token=token) as consul:
        start += ["--consul-addr", consul.http_addr, "--deploy-run-id", "run-42", "--port", "0"]
        try:
            started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60, check=False)
            assert started.returncode == 0, started.stderr

            pid = int((instance / "app.pid").read_text())
            port = int((instance / "app.port").read_text())
            assert process_alive(pid)
            registered = agent_services(consul.http_addr, token)["web-1.0.0"]
            assert registered["Service"] == "web"
            assert (registered["Address"], registered["Port"]) == ("127.0.0.1", port)
            assert registered["Meta"] == {
                "artifact_version": "1.0.0",
                "commit": "c0ffee1.0.0",
                "namespace": NAMESPACE,
                "deploy_run_id": "run-42",
            }
            assert token not in "".join(p.read_text() for p in instance.glob("*.json"))
            # The agent's own HTTP check reaches the chosen port, and follows the unhealthy switch.
            wait_for_check_status(consul.http_addr, "service:web-1.0.0", "passing", token)
            (instance / "unhealthy").touch()
            wait_for_check_status(consul.http_addr, "service:web-1.0.0", "critical", token)

            stopped = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=60, check=False)
            assert stopped.returncode == 0, stopped.stderr
            assert agent_services(consul.http_addr, token) == {}
            assert not process_alive(pid)

            again = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=60, check=False)
            assert again.returncode == 0, again.stderr
        finally:
            kill_group_if_alive(instance / "app.pid")


def test_start_fails_and_leaves_nothing_running_when_consul_is_unreachable(
    images: dict[str, Path], tmp_path: Path
) -> None:
    instance = unpack(images["1.0.0"], tmp_path / "web-1.0.0")
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        dead_consul = f"http://127.0.0.1:{closed.server_address[1]}"  # bound, then closed: nobody listens
    start = [str(instance / "bin" / "start"), "--instance-dir", str(instance)]
    start += ["--consul-addr", dead_consul, "--deploy-run-id", "run-1"]
    try:
        result = subprocess.run(start, capture_output=True, text=True, timeout=60, check=False)

        assert result.returncode == 1
        assert "unreachable" in result.stderr
        assert not process_alive(int((instance / "app.pid").read_text()))
    finally:
        kill_group_if_alive(instance / "app.pid")


# --- Terraform: the local stack ------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalStack:
    workdir: Path
    instance_root: Path
    consul_addr: str

    def run(self, *args: str, timeout: float = 180, extra_env: dict[str, str] | None = None) -> CompletedCommand:
        env = {"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1", **(extra_env or {})}
        if (cli_config := terraform_cli_config()) is not None:
            env["TF_CLI_CONFIG_FILE"] = str(cli_config)
        result = run_command([terraform_binary(), *args], cwd=self.workdir, env=env, timeout=timeout)
        assert result.returncode in (0, 2), f"terraform {args[0]} failed:\n{result.stderr}\n{result.stdout}"
        return result

    def var_args(self, image: Path, version: str, deploy_run_id: str) -> list[str]:
        values = {
            "artifact_id": str(image),
            "artifact_version": version,
            "namespace": NAMESPACE,
            "service_name": "web",
            "consul_addr": self.consul_addr,
            "deploy_run_id": deploy_run_id,
            "instance_root": str(self.instance_root),
        }
        return [arg for name, value in values.items() for arg in ("-var", f"{name}={value}")]

    def apply(
        self, image: Path, version: str, deploy_run_id: str, extra_env: dict[str, str] | None = None
    ) -> CompletedCommand:
        argv = ("apply", "-auto-approve", "-input=false", *self.var_args(image, version, deploy_run_id))
        return self.run(*argv, extra_env=extra_env)

    def outputs(self) -> dict[str, str]:
        raw = json.loads(self.run("output", "-json").stdout)
        return {name: value["value"] for name, value in raw.items()}


@pytest.fixture
def local_stack(consul_standin: ConsulStandIn, tmp_path: Path) -> Iterator[LocalStack]:
    workdir = tmp_path / "stack"
    workdir.mkdir()
    shutil.copy(EXAMPLES / "stacks" / "local" / "main.tf", workdir / "main.tf")
    stack = LocalStack(workdir, tmp_path / "instances", consul_standin.http_addr)
    stack.run("init", "-input=false")
    yield stack
    # Whatever the test did, leave no instance running.
    if (workdir / "terraform.tfstate").exists():
        run_command(
            [
                terraform_binary(),
                "destroy",
                "-auto-approve",
                "-input=false",
                *stack.var_args(Path("x"), "0", "x"),
            ],
            cwd=workdir,
            env={"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"},
            timeout=120,
        )
    for pid_file in stack.instance_root.glob("*/app.pid"):
        kill_group_if_alive(pid_file)


@pytest.mark.slow
def test_local_stack_deploys_replaces_and_destroys_instances(
    images: dict[str, Path], local_stack: LocalStack, consul_standin: ConsulStandIn
) -> None:
    consul_addr = consul_standin.http_addr
    local_stack.apply(images["1.0.0"], "1.0.0", deploy_run_id="run-1")

    outputs = local_stack.outputs()
    assert outputs["service_id"] == "web-1.0.0"
    assert outputs["artifact_version"] == "1.0.0"
    v1_dir = Path(outputs["instance_dir"])
    v1_pid = int((v1_dir / "app.pid").read_text())
    assert process_alive(v1_pid)
    v1 = agent_services(consul_addr)["web-1.0.0"]
    assert v1["Meta"]["deploy_run_id"] == "run-1"
    assert v1["Meta"]["artifact_version"] == "1.0.0"
    assert v1["Meta"]["namespace"] == NAMESPACE
    assert http_get(f"http://127.0.0.1:{v1['Port']}/health")[0] == 200

    # A new deploy run of the same artifact changes nothing: deploy_run_id is not a trigger.
    same = local_stack.run(
        "plan", "-detailed-exitcode", "-input=false", *local_stack.var_args(images["1.0.0"], "1.0.0", "run-2")
    )
    assert same.returncode == 0, same.stdout

    replaced = local_stack.apply(images["2.0.0"], "2.0.0", deploy_run_id="run-3")

    services = agent_services(consul_addr)
    assert list(services) == ["web-2.0.0"], replaced.stdout
    assert services["web-2.0.0"]["Meta"]["deploy_run_id"] == "run-3"
    assert not process_alive(v1_pid)
    assert not v1_dir.exists()
    # create_before_destroy: v2 was registered (start prints its state) before v1 was stopped.
    assert replaced.stdout.index('"service_id": "web-2.0.0"') < replaced.stdout.index('"stopped": "web-1.0.0"')
    wait_for_check_status(consul_addr, "service:web-2.0.0", "passing")
    v2_dir = Path(local_stack.outputs()["instance_dir"])
    v2_pid = int((v2_dir / "app.pid").read_text())
    assert process_alive(v2_pid)

    local_stack.run(
        "destroy", "-auto-approve", "-input=false", *local_stack.var_args(images["2.0.0"], "2.0.0", "run-4")
    )

    assert agent_services(consul_addr) == {}
    assert not process_alive(v2_pid)
    assert not v2_dir.exists()


def test_the_instance_never_holds_terraforms_credentials(images: dict[str, Path], local_stack: LocalStack) -> None:
    canary = "canary-backend-secret-7d1f"
    terraform_env = {"AWS_ACCESS_KEY_ID": "canary-key-id", "AWS_SECRET_ACCESS_KEY": canary, "ICD_TOKEN": canary}
    local_stack.apply(images["1.0.0"], "1.0.0", deploy_run_id="run-1", extra_env=terraform_env)

    instance_dir = Path(local_stack.outputs()["instance_dir"])
    pid = int((instance_dir / "app.pid").read_text())
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert canary not in environ
    assert "AWS_" not in environ
    for path in instance_dir.rglob("*"):
        if path.is_file():
            assert canary not in path.read_text(errors="replace"), path
