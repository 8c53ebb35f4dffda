"""The artifact store against both backends: a local directory and a real S3 endpoint over HTTP (moto_server)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from infra.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    ArtifactExistsError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ArtifactRef,
    ArtifactStore,
    InvalidKeyError,
    LocalBackend,
    S3Backend,
    make_s3_client,
    tree_sha256,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    cache = tmp_path / "cache"
    if request.param == "local":
        return ArtifactStore(LocalBackend(tmp_path / "store"), cache)
    s3_server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    client = make_s3_client(s3_server.endpoint_url)
    return ArtifactStore(S3Backend(bucket, "tuneship/artifacts", client), cache)


def write_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"a": 1}',
        "weights/model.bin": os.urandom(100_000),
        "weights/empty": b"",
        "deep/er/still/file.txt": "naïve ✓".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def corrupt(store: ArtifactStore, key: str, data: bytes) -> None:
    """Overwrite one stored object behind the store's back."""
    store.backend.write_bytes(key, data)


def test_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    files = write_tree(tmp_path / "src")
    ref = store.put_dir(tmp_path / "src", "models/demo")

    assert ref.key == "models/demo"
    assert ref.uri == store.backend.uri("models/demo")
    assert ref.uri.startswith("s3://" if isinstance(store.backend, S3Backend) else "file://")
    assert ref.size == sum(len(d) for d in files.values())
    assert len(ref.sha256) == 64
    assert store.exists("models/demo")
    assert store.ref("models/demo") == ref

    local = store.get_dir(ref)
    assert read_tree(local) == files
    assert store.get_dir("models/demo") == local  # by key, served from the verified cache


def test_same_content_same_ref_and_overwrite_needs_consent(store: ArtifactStore, tmp_path: Path) -> None:
    write_tree(tmp_path / "src")
    first = store.put_dir(tmp_path / "src", "a/b")
    assert store.put_dir(tmp_path / "src", "a/b").sha256 == first.sha256

    (tmp_path / "src" / "config.json").write_bytes(b'{"a": 2}')
    with pytest.raises(ArtifactExistsError, match="a/b"):
        store.put_dir(tmp_path / "src", "a/b")
    second = store.put_dir(tmp_path / "src", "a/b", overwrite=True)
    assert second.sha256 != first.sha256
    assert (store.get_dir(second) / "config.json").read_bytes() == b'{"a": 2}'


def test_corrupted_object_is_detected_naming_the_file(store: ArtifactStore, tmp_path: Path) -> None:
    files = write_tree(tmp_path / "src")
    ref = store.put_dir(tmp_path / "src", "runs/1")
    bad = bytearray(files["weights/model.bin"])
    bad[500] ^= 0xFF  # same size, one flipped byte
    corrupt(store, "runs/1/weights/model.bin", bytes(bad))

    with pytest.raises(ArtifactIntegrityError, match=r"runs/1/weights/model\.bin: sha256 mismatch"):
        store.get_dir(ref)
    assert not (store.cache_dir / "artifacts" / ref.sha256).exists()  # nothing half-verified is cached


def test_changed_manifest_is_detected(store: ArtifactStore, tmp_path: Path) -> None:
    write_tree(tmp_path / "src")
    ref = store.put_dir(tmp_path / "src", "runs/2")
    corrupt(store, f"runs/2/{MANIFEST_NAME}", b'{"format": "tuneship-manifest/1", "files": []}')
    with pytest.raises(ArtifactIntegrityError, match="manifest changed"):
        store.get_dir(ref)


class FailingAfter:
    """Wraps a backend so that the n-th file upload raises, as a crash mid-upload would."""

    def __init__(self, backend: object, fail_at: int) -> None:
        self._backend, self._left = backend, fail_at

    def upload_file(self, local: Path, key: str) -> None:
        self._left -= 1
        if self._left == 0:
            raise ConnectionError("upload interrupted")
        self._backend.upload_file(local, key)

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)


def test_interrupted_upload_is_invisible(store: ArtifactStore, tmp_path: Path) -> None:
    write_tree(tmp_path / "src")
    broken = ArtifactStore(FailingAfter(store.backend, fail_at=3), store.cache_dir)
    with pytest.raises(ConnectionError):
        broken.put_dir(tmp_path / "src", "partial/run")

    # Two files did reach the store, but without a manifest the directory does not exist.
    assert any(k.startswith("partial/run/") for k in store.backend.iter_keys("partial"))
    assert not store.exists("partial/run")
    assert store.list() == []
    assert store.list("partial") == []
    with pytest.raises(ArtifactNotFoundError, match="no manifest"):
        store.get_dir("partial/run")

    ref = store.put_dir(tmp_path / "src", "partial/run")  # a retry completes it
    assert [r.key for r in store.list()] == ["partial/run"]
    assert read_tree(store.get_dir(ref)) == read_tree(tmp_path / "src")


@pytest.mark.parametrize("fail_at", [2, 6])  # while writing the new files beside the old; after the switch
def test_an_interrupted_overwrite_leaves_a_whole_artifact(store: ArtifactStore, tmp_path: Path, fail_at: int) -> None:
    old = write_tree(tmp_path / "old")
    first = store.put_dir(tmp_path / "old", "adapters/run")
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    (tmp_path / "new" / "config.json").write_bytes(b'{"a": 2}')
    (tmp_path / "new" / "deep" / "er" / "still" / "file.txt").unlink()
    new = read_tree(tmp_path / "new")

    broken = ArtifactStore(FailingAfter(store.backend, fail_at=fail_at), tmp_path / "other-cache")
    with pytest.raises(ConnectionError):
        broken.put_dir(tmp_path / "new", "adapters/run", overwrite=True)
    now = store.ref("adapters/run")  # the key still holds a whole artifact: the old one, or the new one
    assert now.sha256 == (first.sha256 if fail_at == 2 else tree_sha256(tmp_path / "new"))
    reader = ArtifactStore(store.backend, tmp_path / f"reader-cache-{fail_at}")
    assert read_tree(reader.get_dir(now)) == (old if fail_at == 2 else new)

    done = store.put_dir(tmp_path / "new", "adapters/run", overwrite=True)  # the retry
    assert read_tree(ArtifactStore(store.backend, tmp_path / "fresh-cache").get_dir(done)) == new
    keys = {k.removeprefix("adapters/run/") for k in store.backend.iter_keys("adapters/run")}
    assert keys == {*new, MANIFEST_NAME}  # plain paths only: no staged copy, no file the new version dropped


def test_list_filters_by_prefix(store: ArtifactStore, tmp_path: Path) -> None:
    write_tree(tmp_path / "src")
    for key in ("datasets/a", "datasets/b", "adapters/x"):
        store.put_dir(tmp_path / "src", key)
    assert [r.key for r in store.list("datasets")] == ["datasets/a", "datasets/b"]
    assert [r.key for r in store.list()] == ["adapters/x", "datasets/a", "datasets/b"]


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/", "", ".", "a/./b", "a\\b"])
def test_bad_keys_are_refused(store: ArtifactStore, tmp_path: Path, key: str) -> None:
    write_tree(tmp_path / "src")
    with pytest.raises(InvalidKeyError, match="invalid artifact key"):
        store.put_dir(tmp_path / "src", key)
    with pytest.raises(InvalidKeyError):
        store.exists(key)
    with pytest.raises(InvalidKeyError):
        store.get_dir(key)
    assert list(store.backend.iter_keys("")) == []


def test_manifest_paths_cannot_escape_the_cache(store: ArtifactStore, tmp_path: Path) -> None:
    evil = json.dumps(
        {"format": "tuneship-manifest/1", "files": [{"path": "../../escape", "size": 1, "sha256": "0" * 64}]}
    ).encode()
    store.backend.write_bytes(f"evil/{MANIFEST_NAME}", evil)
    with pytest.raises(InvalidKeyError, match="escape"):
        store.get_dir("evil")
    assert not (tmp_path / "escape").exists()


def test_50_mb_file_crosses_via_multipart(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    client = make_s3_client(s3_server.endpoint_url)
    store = ArtifactStore(S3Backend(s3_bucket, "big", client), tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(50 * 1024 * 1024)
    (src / "weights.safetensors").write_bytes(payload)

    ref = store.put_dir(src, "models/big")

    etag = client.head_object(Bucket=s3_bucket, Key="big/models/big/weights.safetensors")["ETag"].strip('"')
    assert etag.endswith("-7"), f"expected a 7-part multipart upload (8 MiB parts), got ETag {etag}"
    local = store.get_dir(ref)
    assert hashlib.sha256((local / "weights.safetensors").read_bytes()).digest() == hashlib.sha256(payload).digest()


def test_a_ref_sha256_is_hex_or_refused(store: ArtifactStore, tmp_path: Path) -> None:
    """A ref's sha256 names the cache directory: only 64 hex digits, however the ref was built."""
    write_tree(tmp_path / "src")
    ref = store.put_dir(tmp_path / "src", "good")
    with pytest.raises(ValueError, match="sha256"):
        ArtifactRef(**{**ref.model_dump(), "sha256": "../../dir"})
    crafted = ref.model_copy(update={"sha256": "../../dir"})  # model_copy does not validate
    with pytest.raises(ArtifactError, match="not a sha256"):
        store.get_dir(crafted)


def test_a_symlink_cannot_lead_out_of_a_local_store(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not the store's")
    store = ArtifactStore(LocalBackend(tmp_path / "root"), tmp_path / "cache")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(outside)
    with pytest.raises(InvalidKeyError, match="leads out of the store's root"):
        store.backend.read_bytes("link/secret")
    with pytest.raises(InvalidKeyError, match="leads out"):
        store.backend.write_bytes("link/planted", b"x")
    assert not (outside / "planted").exists()
