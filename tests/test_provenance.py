"""Signed provenance and deployment records: statements, DSSE envelopes and every way a check refuses one."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from icd.errors import ProvenanceError
from icd.registry import provenance as prov
from icd.registry.models import ArtifactVersion
from icd.registry.registry import Registry
from icd.registry.signing import Sealer

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
BUILDER = prov.builder_id("bucket", "registry/")
IMAGE_SHA = "ab" * 32
COMMIT = "c0ffee" + "0" * 34
STARTED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
FINISHED = datetime(2026, 1, 1, 12, 5, 30, tzinfo=UTC)


def version(**overrides: Any) -> ArtifactVersion:
    fields: dict[str, Any] = {
        "namespace": "acme/web",
        "version": 3,
        "git_commit": COMMIT,
        "git_ref": "main",
        "packer_run_uuid": "run-3",
        "builder_type": "qemu",
        "artifacts": {"local": "/images/web-3.qcow2"},
        "artifact_sha256": {"local": IMAGE_SHA},
        "created_at": STARTED,
        "created_by": "flow-run/test",
    }
    return ArtifactVersion(**(fields | overrides))


def facts(**overrides: Any) -> prov.BuildFacts:
    fields: dict[str, Any] = {
        "repository": "https://github.com/acme/web.git",
        "ref": "main",
        "commit": COMMIT,
        "template_digest": "cd" * 32,
        "packer_only": ("qemu.web",),
        "build_run_id": "11111111-2222-3333-4444-555555555555",
        "started_on": STARTED,
        "finished_on": FINISHED,
    }
    return prov.BuildFacts(**(fields | overrides))


def signed(statement: dict[str, Any] | None = None, key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    return prov.sign_envelope(statement or prov.build_statement(version(), facts(), builder=BUILDER), key)


def payload_of(envelope: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return result


def with_payload(envelope: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The envelope with its payload changed and its signature left as it was: what a doctored record is."""
    statement = payload_of(envelope)
    change(statement)
    return {**envelope, "payload": base64.b64encode(json.dumps(statement).encode()).decode()}


# --- statements ---------------------------------------------------------------------------------------


def test_a_statement_is_slsa_v1_provenance_naming_the_image_the_source_and_the_run() -> None:
    statement = prov.build_statement(version(), facts(), builder=BUILDER)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [
        {"name": "/images/web-3.qcow2", "digest": {"sha256": IMAGE_SHA}, "annotations": {"platform": "local"}}
    ]
    definition = statement["predicate"]["buildDefinition"]
    assert definition["buildType"] == prov.BUILD_TYPE
    assert definition["externalParameters"] == {
        "repository": "https://github.com/acme/web.git",
        "ref": "main",
        "commit": COMMIT,
        "templateDigest": {"sha256": "cd" * 32},
        "packerOnly": ["qemu.web"],
    }
    assert definition["resolvedDependencies"] == [
        {"uri": "git+https://github.com/acme/web.git@main", "digest": {"gitCommit": COMMIT}}
    ]
    assert definition["internalParameters"]["version"] == 3
    assert statement["predicate"]["runDetails"] == {
        "builder": {"id": BUILDER},
        "metadata": {
            "invocationId": "11111111-2222-3333-4444-555555555555",
            "startedOn": "2026-01-01T12:00:00Z",
            "finishedOn": "2026-01-01T12:05:30Z",
        },
    }


def test_a_cloud_image_without_bytes_is_named_by_the_digest_of_its_id_and_says_so() -> None:
    cloud = version(artifacts={"us-east-1": "ami-123"}, artifact_sha256={})
    (subject,) = prov.build_statement(cloud, facts(), builder=BUILDER)["subject"]
    assert subject["digest"] == {"sha256": hashlib.sha256(b"ami-123").hexdigest()}
    assert subject["annotations"] == {"platform": "us-east-1", "digestOf": "artifact-id"}


@pytest.mark.parametrize(
    ("repository", "uri"),
    [("https://github.com/a/b", "git+https://github.com/a/b@main"), ("/srv/git/b", "git+file:///srv/git/b@main")],
)
def test_the_repository_becomes_a_git_dependency_uri(repository: str, uri: str) -> None:
    statement = prov.build_statement(version(), facts(repository=repository), builder=BUILDER)
    assert statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]["uri"] == uri


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        prov.build_statement(version(), facts(started_on=datetime(2026, 1, 1)), builder=BUILDER)


def test_the_template_digest_changes_with_any_content_name_or_file(tmp_path: Path) -> None:
    (tmp_path / "web.pkr.hcl").write_text("source {}")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text("echo hi")
    first = prov.template_digest(tmp_path)
    assert first == prov.template_digest(tmp_path)
    (tmp_path / "scripts" / "setup.sh").write_text("echo bye")
    changed = prov.template_digest(tmp_path)
    (tmp_path / "scripts" / "setup.sh").rename(tmp_path / "scripts" / "other.sh")
    renamed = prov.template_digest(tmp_path)
    (tmp_path / "extra.pkrvars.hcl").write_text("")
    added = prov.template_digest(tmp_path)
    assert len({first, changed, renamed, added}) == 4


# --- keys ---------------------------------------------------------------------------------------------


def test_a_key_is_read_from_its_seed_or_pem_and_its_id_is_the_sha256_of_the_public_key() -> None:
    seed = base64.b64encode(bytes(range(32))).decode()
    pem = KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    for text in (seed, f"  {seed}\n", pem):
        assert prov.key_id(prov.load_private_key(text).public_key()) == prov.key_id(KEY.public_key())
    assert prov.key_id(KEY.public_key()) == hashlib.sha256(prov.raw_public_key(KEY.public_key())).hexdigest()
    assert len(base64.b64decode(prov.generate_key_text())) == 32
    public = base64.b64encode(prov.raw_public_key(KEY.public_key())).decode()
    assert prov.key_id(prov.load_public_key(public)) == prov.key_id(KEY.public_key())


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not base64!", "neither an Ed25519 PEM key nor base64"),
        (base64.b64encode(b"short").decode(), "is 5 bytes"),
        ("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----", "neither an Ed25519 PEM key"),
    ],
)
def test_a_bad_key_is_refused_without_showing_it(text: str, says: str) -> None:
    with pytest.raises(ProvenanceError, match=says) as caught:
        prov.load_private_key(text)
    assert text not in str(caught.value)


# --- envelopes ----------------------------------------------------------------------------------------


def test_an_envelope_is_dsse_signed_over_pae_and_verifies() -> None:
    envelope = signed()
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    (signature,) = envelope["signatures"]
    assert signature["keyid"] == prov.key_id(KEY.public_key())
    body = base64.b64decode(envelope["payload"])
    # The DSSE spec's own encoding, spelled out: a verifier that is not this code must agree.
    expected = b"DSSEv1 28 application/vnd.in-toto+json %d " % len(body) + body
    KEY.public_key().verify(base64.b64decode(signature["sig"]), expected)
    verified = prov.verify_envelope(envelope, [KEY.public_key()])
    assert verified.keyid == signature["keyid"]
    assert verified.statement == prov.build_statement(version(), facts(), builder=BUILDER)


def _unsigned(envelope: dict[str, Any]) -> dict[str, Any]:
    return {**envelope, "signatures": []}


def _no_signatures_field(envelope: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in envelope.items() if key != "signatures"}


def _doctored(envelope: dict[str, Any]) -> dict[str, Any]:
    return with_payload(envelope, lambda s: s["subject"][0]["digest"].update(sha256="ee" * 32))


def _wrong_type(envelope: dict[str, Any]) -> dict[str, Any]:
    return {**envelope, "payloadType": "application/json"}


def _other_key(_envelope: dict[str, Any]) -> dict[str, Any]:
    return signed(key=OTHER_KEY)


def _keyid_stripped_and_doctored(envelope: dict[str, Any]) -> dict[str, Any]:
    doctored = _doctored(envelope)
    return {**doctored, "signatures": [{"keyid": "", "sig": envelope["signatures"][0]["sig"]}]}


def _signature_swapped(envelope: dict[str, Any]) -> dict[str, Any]:
    other = signed(key=OTHER_KEY)
    return {
        **envelope,
        "signatures": [{"keyid": envelope["signatures"][0]["keyid"], "sig": other["signatures"][0]["sig"]}],
    }


def _not_base64(envelope: dict[str, Any]) -> dict[str, Any]:
    return {**envelope, "payload": "%%%"}


@pytest.mark.parametrize(
    ("breaks", "says"),
    [
        pytest.param(_unsigned, "is unsigned: it carries no signature", id="unsigned"),
        pytest.param(_no_signatures_field, "is unsigned", id="no signatures field"),
        pytest.param(
            _doctored, "signature does not match its payload: it was changed after it was signed", id="doctored"
        ),
        pytest.param(
            _wrong_type, "has payloadType 'application/json', expected 'application/vnd.in-toto+json'", id="type"
        ),
        pytest.param(_other_key, "not by this registry's provenance key", id="wrong key"),
        pytest.param(_keyid_stripped_and_doctored, "no provenance key of this registry verifies", id="no keyid"),
        pytest.param(_signature_swapped, "changed after it was signed", id="signature of another key"),
        pytest.param(_not_base64, "payload is not base64", id="not base64"),
        pytest.param(lambda _e: ["not", "an", "envelope"], "is not a DSSE envelope", id="not an envelope"),
    ],
)
def test_a_broken_envelope_is_refused_saying_why(breaks: Callable[[dict[str, Any]], Any], says: str) -> None:
    with pytest.raises(ProvenanceError, match=re.escape(says)):
        prov.verify_envelope(breaks(signed()), [KEY.public_key()])


def test_an_envelope_without_keyid_verifies_with_any_trusted_key() -> None:
    envelope = signed()
    envelope["signatures"] = [{"sig": envelope["signatures"][0]["sig"]}]
    assert prov.verify_envelope(envelope, [OTHER_KEY.public_key(), KEY.public_key()]).statement["_type"]


def test_the_payload_type_is_signed_so_a_deployment_record_cannot_pass_as_provenance() -> None:
    record = prov.sign_envelope({"_type": prov.DEPLOYMENT_TYPE}, KEY, payload_type=prov.DEPLOYMENT_PAYLOAD_TYPE)
    relabelled = {**record, "payloadType": prov.IN_TOTO_PAYLOAD_TYPE}
    with pytest.raises(ProvenanceError, match="changed after it was signed"):
        prov.verify_envelope(relabelled, [KEY.public_key()])


# --- provenance of a version ----------------------------------------------------------------------------


def _verify(envelope: Any, of: ArtifactVersion | None = None, platform: str = "local") -> prov.VerifiedStatement:
    return prov.verify_provenance(envelope, of or version(), platform, [KEY.public_key()], builder=BUILDER)


def test_the_provenance_of_a_version_verifies() -> None:
    assert _verify(signed()).statement["subject"][0]["digest"]["sha256"] == IMAGE_SHA


def _resigned(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    statement = prov.build_statement(version(), facts(), builder=BUILDER)
    change(statement)
    return signed(statement)


@pytest.mark.parametrize(
    ("envelope", "of", "says"),
    [
        pytest.param(None, None, "has no provenance .* rebuild commit c0ffee000000", id="none stored"),
        pytest.param(signed(), version(artifact_sha256={"local": "ff" * 32}), "but the image's is ffff", id="digest"),
        pytest.param(signed(), version(version=4), "is that of acme/web v3", id="another version's"),
        pytest.param(signed(), version(git_commit="1" * 40), "names commit c0ffee", id="another commit"),
        pytest.param(signed(), version(artifacts={"local": "/elsewhere.qcow2"}), "names no subject", id="no subject"),
        pytest.param(
            _resigned(lambda s: s["predicate"]["runDetails"]["builder"].update(id="urn:else")),
            None,
            "names builder 'urn:else'",
            id="another builder",
        ),
        pytest.param(
            _resigned(lambda s: s.update(predicateType="https://slsa.dev/provenance/v0.2")),
            None,
            "not a SLSA v1 provenance",
            id="old predicate",
        ),
        pytest.param(_doctored(signed()), None, "changed after it was signed", id="doctored"),
        pytest.param(_unsigned(signed()), None, "unsigned", id="unsigned"),
    ],
)
def test_a_provenance_that_does_not_prove_this_image_is_refused(
    envelope: Any, of: ArtifactVersion | None, says: str
) -> None:
    with pytest.raises(ProvenanceError, match=says) as caught:
        _verify(copy.deepcopy(envelope), of)
    assert "acme/web v" in str(caught.value)


def test_a_platform_the_version_lacks_is_refused() -> None:
    with pytest.raises(ProvenanceError, match="no 'us-east-1' artifact"):
        _verify(signed(), platform="us-east-1")


# --- in the registry (moto) -----------------------------------------------------------------------------


def _registry(s3_client: Any, bucket: str, key: Ed25519PrivateKey | None = KEY) -> Registry:
    return Registry(s3_client, bucket, prefix="registry/", sealer=Sealer(b"k" * 32), provenance_key=key)


def _register(registry: Registry) -> ArtifactVersion:
    return registry.register(
        "acme/web",
        git_commit=COMMIT,
        git_ref="main",
        packer_run_uuid="run-1",
        builder_type="qemu",
        artifacts={"local": "/images/web-1.qcow2"},
        artifact_sha256={"local": IMAGE_SHA},
        created_by="test",
    ).version


def test_the_registry_stores_the_provenance_once_beside_the_version_and_verifies_it(
    s3_client: Any, s3_bucket: str
) -> None:
    registry = _registry(s3_client, s3_bucket)
    registered = _register(registry)
    assert registry.provenance("acme/web", 1) is None
    with pytest.raises(ProvenanceError, match="rebuild commit"):
        registry.verify_provenance(registered, "local")
    first = registry.write_provenance(registered, facts())
    again = registry.write_provenance(registered, facts(finished_on=datetime(2026, 2, 1, tzinfo=UTC)))
    assert again == first == registry.provenance("acme/web", 1)
    stored = s3_client.get_object(
        Bucket=s3_bucket, Key="registry/namespaces/acme/web/versions/00000001.provenance.dsse.json"
    )
    assert json.loads(stored["Body"].read()) == first
    assert registry.verify_provenance(registered, "local").keyid == prov.key_id(KEY.public_key())
    # Another installation's key does not vouch for this one's artifacts.
    with pytest.raises(ProvenanceError, match="not by this registry's provenance key"):
        _registry(s3_client, s3_bucket, OTHER_KEY).verify_provenance(registered, "local")
    with pytest.raises(ProvenanceError, match=r"no provenance_key.*icd-setup blocks"):
        _registry(s3_client, s3_bucket, None).verify_provenance(registered, "local")


def test_deployment_records_are_signed_listed_per_workspace_and_a_doctored_one_is_shown_broken(
    s3_client: Any, s3_bucket: str
) -> None:
    registry = _registry(s3_client, s3_bucket)
    runs = ["aaaaaaaa-0000-0000-0000-000000000001", "aaaaaaaa-0000-0000-0000-000000000002"]
    for minute, run in enumerate(runs):
        registry.record_deployment(
            deployment_facts(apply_run_id=run, recorded_at=datetime(2026, 1, 1, 12, minute, tzinfo=UTC))
        )
    registry.record_deployment(deployment_facts(workspace="prod", apply_run_id=runs[0]))
    records = registry.deployment_records("staging")
    assert [record.problem for record in records] == ["", ""]
    first = records[0].verified
    assert first is not None
    assert first.payload_type == prov.DEPLOYMENT_PAYLOAD_TYPE
    assert first.statement["approval"] == {"approvers": "slack:T1/U1 (Alice)", "source": "slack", "comment": "ok"}
    assert first.statement["apply"] == {"runId": runs[0], "outputs": {"service_id": "web-3"}}
    assert first.statement["verdict"] == {"outcome": "Deployed", "gate": "passing after 2.0s", "detail": ""}
    key = f"registry/deployments/staging/{runs[1]}.dsse.json"
    doctored = with_payload(
        json.loads(s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()),
        lambda s: s["approval"].update(approvers="mallory"),
    )
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(doctored).encode())
    broken = registry.deployment_records("staging")
    assert [bool(record.verified) for record in broken] == [False, True]
    assert "changed after it was signed" in broken[0].problem
    assert broken[0].where.endswith(f"{runs[1]}.dsse.json")


def deployment_facts(**overrides: Any) -> prov.DeploymentFacts:
    fields: dict[str, Any] = {
        "workspace": "staging",
        "namespace": "acme/web",
        "version": 3,
        "artifact_id": "/images/web-3.qcow2",
        "artifact_sha256": IMAGE_SHA,
        "plan_sha256": "12" * 32,
        "approver": "slack:T1/U1 (Alice)",
        "approval_source": "slack",
        "approval_comment": "ok",
        "apply_run_id": "aaaaaaaa-0000-0000-0000-000000000001",
        "outputs": {"service_id": "web-3"},
        "verdict": "Deployed",
        "gate": "passing after 2.0s",
        "detail": "",
        "recorded_at": FINISHED,
    }
    return prov.DeploymentFacts(**(fields | overrides))


def sign_as_built(registry: Registry, record: ArtifactVersion, *, repository: str = "/tests/hand-registered") -> None:
    """What build-artifact's registration writes, for tests that register versions through the registry API
    (their deploys check provenance like any other; this signs with the installation's own key)."""
    now = datetime.now(UTC)
    registry.write_provenance(
        record,
        prov.BuildFacts(
            repository=repository,
            ref=record.git_ref,
            commit=record.git_commit,
            template_digest=hashlib.sha256(b"").hexdigest(),
            packer_only=(),
            build_run_id=record.labels.get("build_run_id", "registered-by-hand"),
            started_on=now,
            finished_on=now,
        ),
    )
