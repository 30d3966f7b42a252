"""The Packer adapter against the real `packer` 1.6.6 binary (and a moto server for amazon-ebs)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import boto3
import pytest
from prefect import flow, get_run_logger, task

from icd.errors import PackerError, ToolTimeoutError
from icd.tools.packer import (
    MANIFEST_FILENAME,
    ManifestBuild,
    ManifestFile,
    PackerBuild,
    build,
    build_argv,
    parse_artifact_id,
    parse_machine_readable,
    parse_manifest,
    template_sources,
)
from icd.tools.process import redact_argv
from tests.helpers import pids_working_in
from tests.waiting import wait_until

FIXTURES = Path(__file__).parent / "fixtures" / "packer"


@task
def packer_build_task(template_dir: Path, marker: str) -> str:
    result = build(template_dir, {"marker": marker}, on_progress=get_run_logger().info)
    return result.packer_run_uuid


@flow
def packer_build_flow(template_dir: Path, marker: str) -> str:
    return packer_build_task(template_dir, marker)


def template(name: str, tmp_path: Path) -> Path:
    """A private copy of a fixture template: builds write their manifest and artifacts beside it."""
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name)).resolve()


# --- pure functions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "variables", "only", "expected"),
    [
        (build_argv, {}, None, ["packer", "build", "-machine-readable", "-color=false", "."]),
        (build_argv, {}, [], ["packer", "build", "-machine-readable", "-color=false", "."]),
        (
            build_argv,
            {"zone": "b", "arch": "x86_64", "motd": "a=b, c"},
            ["file.greeting", "null.smoke"],
            [
                "packer",
                "build",
                "-machine-readable",
                "-color=false",
                "-only=file.greeting,null.smoke",
                "-var",
                "arch=x86_64",
                "-var",
                "motd=a=b, c",
                "-var",
                "zone=b",
                ".",
            ],
        ),
    ],
)
def test_argv_builders(builder, variables, only, expected) -> None:  # type: ignore[no-untyped-def]
    argv = builder(variables, only=only)
    assert argv == expected
    assert "-force" not in argv


def test_redact_argv_hides_every_variable_value() -> None:
    argv = [*build_argv({"db_password": "hunter2", "version": "1.0"}), "-var=token=s3cr3t"]
    redacted = redact_argv(argv)
    assert "hunter2" not in " ".join(redacted)
    assert "s3cr3t" not in " ".join(redacted)
    assert redacted[4:8] == ("-var", "db_password=***", "-var", "version=***")
    assert redacted[-1] == "-var=token=***"


@pytest.mark.parametrize(
    ("artifact_id", "builder_type", "expected"),
    [
        ("us-east-1:ami-0abc", "amazon-ebs", {"us-east-1": "ami-0abc"}),
        (
            "us-east-1:ami-0abc,us-west-2:ami-0def",
            "amazon-ebs",
            {"us-east-1": "ami-0abc", "us-west-2": "ami-0def"},
        ),
        ("us-gov-west-1:ami-1", "amazon-ebs", {"us-gov-west-1": "ami-1"}),
        ("Null", "null", {"null": "Null"}),
        ("File", "file", {"file": "File"}),
        ("out/disk.img", "file", {"file": "out/disk.img"}),
        ("sha256:4a5b6c", "docker", {"docker": "sha256:4a5b6c"}),
        ("us-east-1:ami-1,garbage", "amazon-ebs", {"amazon-ebs": "us-east-1:ami-1,garbage"}),
    ],
)
def test_parse_artifact_id(artifact_id: str, builder_type: str, expected: dict[str, str]) -> None:
    assert parse_artifact_id(artifact_id, builder_type) == expected


def test_parse_machine_readable_unescapes_commas_and_newlines() -> None:
    say = parse_machine_readable(
        "1795712314,,ui,say,==> amazon-ebs.web: No volumes to clean up%!(PACKER_COMMA) skipping"
    )
    assert say is not None
    assert (say.timestamp, say.target, say.type, say.ui_kind) == (1795712314, "", "ui", "say")
    assert say.text == "==> amazon-ebs.web: No volumes to clean up, skipping"

    error = parse_machine_readable("1795712259,,ui,error,Error: Missing item\\n\\n  on a.pkr.hcl line 9\\n\\n")
    assert error is not None
    assert error.ui_kind == "error"
    assert error.text == "Error: Missing item\n\n  on a.pkr.hcl line 9"

    artifact = parse_machine_readable("1795712314,amazon-ebs.web,artifact,0,id,us-east-1:ami-3da1")
    assert artifact is not None
    assert (artifact.target, artifact.type, artifact.data) == (
        "amazon-ebs.web",
        "artifact",
        ("0", "id", "us-east-1:ami-3da1"),
    )
    assert artifact.ui_kind is None
    assert artifact.text == ""

    assert parse_machine_readable("panic: runtime error") is None


def test_parse_manifest_keeps_only_the_last_run() -> None:
    entry = {
        "name": "web",
        "builder_type": "amazon-ebs",
        "build_time": 1,
        "files": None,
        "artifact_id": "us-east-1:ami-old",
        "packer_run_uuid": "run-1",
        "custom_data": None,
    }
    document = {
        "builds": [entry, {**entry, "artifact_id": "us-east-1:ami-new", "packer_run_uuid": "run-2"}],
        "last_run_uuid": "run-2",
    }
    result = parse_manifest(document)
    assert result == PackerBuild(
        packer_run_uuid="run-2",
        builds=(
            ManifestBuild(
                name="web",
                builder_type="amazon-ebs",
                artifact_ids={"us-east-1": "ami-new"},
                packer_run_uuid="run-2",
                files=(),
                custom_data={},
                build_time=1,
            ),
        ),
    )


# --- the real binary ----------------------------------------------------------------------------------


@pytest.mark.tools
def test_local_build_returns_this_runs_manifest(tmp_path: Path) -> None:
    template_dir = template("local", tmp_path)

    before = int(time.time())
    result = build(template_dir, {"greeting": "world", "version": "1.2.3"})
    after = int(time.time())

    assert (template_dir / "out" / "greeting.txt").read_text() == "hello world"
    by_source = {b.source: b for b in result.builds}
    assert set(by_source) == {"file.greeting", "null.smoke"}
    greeting = by_source["file.greeting"]
    assert greeting.builder_type == "file"
    assert greeting.name == "greeting"
    assert greeting.artifact_ids == {"file": "File"}
    assert greeting.files == (ManifestFile(name="out/greeting.txt", size=len("hello world")),)
    assert greeting.custom_data == {"greeting": "world", "version": "1.2.3"}
    assert before <= greeting.build_time <= after
    assert by_source["null.smoke"].artifact_ids == {"null": "Null"}
    assert by_source["null.smoke"].files == ()
    manifest = json.loads((template_dir / MANIFEST_FILENAME).read_text())
    assert result.packer_run_uuid == manifest["last_run_uuid"]
    assert {b.packer_run_uuid for b in result.builds} == {result.packer_run_uuid}


@pytest.mark.tools
def test_only_limits_the_build_to_the_chosen_sources(tmp_path: Path) -> None:
    template_dir = template("local", tmp_path)

    result = build(template_dir, {"greeting": "world"}, only=["null.smoke"])

    assert [b.source for b in result.builds] == ["null.smoke"]
    assert not (template_dir / "out").exists()


@pytest.mark.tools
def test_second_build_returns_only_the_second_runs_builds(tmp_path: Path) -> None:
    template_dir = template("local", tmp_path)

    first = build(template_dir, {"greeting": "one", "version": "1"})
    second = build(template_dir, {"greeting": "two", "version": "2"})

    assert first.packer_run_uuid != second.packer_run_uuid
    assert len(second.builds) == 2
    assert {b.packer_run_uuid for b in second.builds} == {second.packer_run_uuid}
    assert {b.custom_data["version"] for b in second.builds} == {"2"}
    # The manifest really did append: both runs are in the file.
    manifest = json.loads((template_dir / MANIFEST_FILENAME).read_text())
    assert len(manifest["builds"]) == 4


@pytest.mark.tools
def test_amazon_ebs_against_moto_builds_a_tagged_ami(tmp_path: Path, moto_endpoint: str) -> None:
    template_dir = template("ami", tmp_path)
    progress: list[str] = []

    result = build(
        template_dir,
        {"ec2_endpoint": moto_endpoint, "version": "1.2.3"},
        timeout=120,
        on_progress=progress.append,
    )

    [ami_build] = result.builds
    assert ami_build.builder_type == "amazon-ebs"
    assert ami_build.source == "amazon-ebs.web"
    assert list(ami_build.artifact_ids) == ["us-east-1"]
    ami_id = ami_build.artifact_ids["us-east-1"]
    assert ami_id.startswith("ami-")
    ec2 = boto3.client(
        "ec2",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    [image] = ec2.describe_images(ImageIds=[ami_id])["Images"]
    tags = {tag["Key"]: tag["Value"] for tag in image["Tags"]}
    assert tags == {"namespace": "acmeinc/web", "version": "1.2.3"}
    assert image["Name"].startswith("icd-test-web-1.2.3-")
    assert any(ami_id in line for line in progress)


@pytest.mark.tools
def test_broken_template_raises_packers_message_and_builds_nothing(tmp_path: Path) -> None:
    template_dir = template("broken", tmp_path)
    progress: list[str] = []

    with pytest.raises(PackerError) as caught:
        build(template_dir, {}, on_progress=progress.append)

    message = str(caught.value)
    assert "broken.pkr.hcl line 7" in message
    assert 'An argument named "inlinez" is not' in message
    assert caught.value.exit_code == 1
    # No separate validate (issue 24): packer build refuses the template before any builder starts.
    assert caught.value.argv[1] == "build"
    assert not (template_dir / MANIFEST_FILENAME).exists()
    assert progress[0].startswith("Error: Failed preparing provisioner-block")
    assert not any("null.smoke" in line for line in progress), "a builder started"


@pytest.mark.tools
def test_undeclared_variable_is_a_template_error(tmp_path: Path) -> None:
    template_dir = template("steps", tmp_path)

    with pytest.raises(PackerError, match='A "api_token" variable was passed') as caught:
        build(template_dir, {"api_token": "s3cr3t"})

    assert "s3cr3t" not in " ".join(caught.value.argv)
    assert not (template_dir / MANIFEST_FILENAME).exists()


@pytest.mark.tools
def test_failed_build_carries_packers_error_lines_and_exit_code(tmp_path: Path) -> None:
    template_dir = template("steps", tmp_path)

    with pytest.raises(PackerError, match="exit code 1") as caught:
        build(template_dir, {"exit_code": "3"})

    assert caught.value.exit_code == 1
    assert "Script exited with non-zero exit status: 3" in str(caught.value)
    assert caught.value.argv[1] == "build"


@pytest.mark.tools
def test_template_without_manifest_post_processor_is_an_error(tmp_path: Path) -> None:
    template_dir = template("no_manifest", tmp_path)

    with pytest.raises(PackerError, match='no `post-processor "manifest"'):
        build(template_dir, {})


@pytest.mark.tools
def test_stale_manifest_from_an_earlier_run_is_not_mistaken_for_this_one(tmp_path: Path) -> None:
    template_dir = template("no_manifest", tmp_path)
    stale = {
        "builds": [
            {
                "name": "smoke",
                "builder_type": "null",
                "build_time": 1,
                "files": None,
                "artifact_id": "Null",
                "packer_run_uuid": "earlier-run",
                "custom_data": None,
            }
        ],
        "last_run_uuid": "earlier-run",
    }
    (template_dir / MANIFEST_FILENAME).write_text(json.dumps(stale))

    with pytest.raises(PackerError, match='no `post-processor "manifest"'):
        build(template_dir, {})


@pytest.mark.tools
def test_progress_streams_while_the_build_runs(tmp_path: Path) -> None:
    template_dir = template("steps", tmp_path)
    seen: list[tuple[str, int]] = []

    def on_progress(text: str) -> None:
        # How many processes (packer, its plugins, the step's shell) are still working at this line.
        seen.append((text, len(pids_working_in(template_dir))))

    result = build(template_dir, {"marker": "marker-7f3a", "sleep_seconds": "1"}, on_progress=on_progress)

    live_at_marker = next(live for text, live in seen if "marker-7f3a" in text)
    assert live_at_marker >= 2, "the marker arrived only when the build had finished"
    assert any("step-finished" in text for text, _ in seen)
    assert all("%!(PACKER_COMMA)" not in text and "\\n" not in text for text, _ in seen)
    assert [b.source for b in result.builds] == ["null.steps"]


@pytest.mark.tools
def test_a_failing_progress_sink_does_not_stall_the_build(tmp_path: Path) -> None:
    template_dir = template("steps", tmp_path)
    calls: list[str] = []

    def broken_sink(text: str) -> None:
        calls.append(text)
        raise RuntimeError("log shipping is down")

    result = build(template_dir, {"sleep_seconds": "0"}, timeout=30, on_progress=broken_sink)

    assert len(calls) == 1
    assert [b.source for b in result.builds] == ["null.steps"]


@pytest.mark.timeout(60)
@pytest.mark.tools
def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    template_dir = template("steps", tmp_path)
    running_during_build: list[int] = []

    def on_progress(text: str) -> None:
        if "marker-timeout" in text:
            # Wait until the step's shell is running beside packer and its plugin.
            wait_until(lambda: len(pids_working_in(template_dir)) >= 3, timeout=10, message="no shell")
            running_during_build.extend(pids_working_in(template_dir))

    with pytest.raises(ToolTimeoutError) as caught:
        build(
            template_dir,
            {"marker": "marker-timeout", "sleep_seconds": "60"},
            timeout=2,
            on_progress=on_progress,
        )

    # packer, its plugin processes and the shell-local script were all working in the template directory.
    assert len(running_during_build) >= 3
    assert pids_working_in(template_dir) == []
    assert caught.value.argv[1] == "build"
    assert not (template_dir / MANIFEST_FILENAME).exists()


@pytest.mark.slow
@pytest.mark.tools
def test_progress_reaches_the_prefect_run_logger(
    tmp_path: Path, prefect_server: object, caplog: pytest.LogCaptureFixture
) -> None:
    template_dir = template("steps", tmp_path)

    with caplog.at_level("INFO", logger="prefect.task_runs"):
        state = packer_build_flow(template_dir, "marker-prefect-5c1d", return_state=True)

    assert state.is_completed()
    task_run_lines = [r.getMessage() for r in caplog.records if r.name == "prefect.task_runs"]
    assert "    null.steps: marker-prefect-5c1d" in task_run_lines


@pytest.mark.tools
def test_an_only_that_matches_no_source_names_the_sources(tmp_path: Path) -> None:
    template_dir = template("local", tmp_path)
    assert template_sources(template_dir) == ["file.greeting", "null.smoke"]

    match = r"null\.local_image matches no source .* declares file\.greeting, null\.smoke"
    with pytest.raises(PackerError, match=match):
        build(template_dir, {"greeting": "world"}, only=["null.local_image"])
