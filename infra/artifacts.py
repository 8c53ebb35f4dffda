"""The artifact store: directories in, small verifiable refs out.

One interface, two backends: a local directory (the embedded default) and S3 through boto3's transfer
manager (any S3-compatible endpoint). ``put_dir`` uploads every file, then writes a manifest
(relative path, size and sha256 per file) **last**: a directory without a manifest is invisible, so an
interrupted upload never looks complete. ``get_dir`` downloads into a content-addressed cache and
verifies every sha256 before the directory appears there.

    store = open_store(load_settings())
    ref = store.put_dir(Path("out/adapter"), "adapters/run-42")
    local = store.get_dir(ref)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import UserError
from infra.settings import Settings, SettingsError

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "tuneship-manifest/1"
_CHUNK = 1 << 20


class ArtifactError(UserError):
    """Base class for artifact-store errors."""


class InvalidKeyError(ArtifactError, ValueError):
    """A key or a manifest path is absolute, escapes its root, or has empty segments."""


class ArtifactNotFoundError(ArtifactError, KeyError):
    """No complete artifact (one with a manifest) exists at the key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ArtifactExistsError(ArtifactError):
    """A different artifact already exists at the key and overwrite was not asked for."""


class ArtifactIntegrityError(ArtifactError):
    """A downloaded file or manifest does not match its recorded sha256 or size."""


class ArtifactRef(BaseModel):
    """A small, frozen pointer to a complete artifact directory.

    ``sha256`` is the hash of the manifest's file list (every file's path, size and hash): it identifies the content.
    """

    model_config = ConfigDict(frozen=True)

    uri: str
    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the manifest (a cache directory name)")
    size: int
    created_at: datetime


ARTIFACT_SCHEME = "artifact://"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def artifact_of(source: str, store: ArtifactStore) -> tuple[ArtifactRef, str] | None:
    """For ``artifact://KEY[/PATH]``: the artifact that holds it and the path inside; else None."""
    rest = source.removeprefix(ARTIFACT_SCHEME)
    for ref in sorted(store.list(), key=lambda r: -len(r.key)):
        if rest == ref.key or rest.startswith(ref.key + "/"):
            return ref, rest[len(ref.key) :].lstrip("/")
    return None


def local_path(source: str, store: ArtifactStore, *, what: str) -> Path:
    """A local path for ``source``: ``artifact://KEY[/PATH]`` (a verified copy from ``store``) or a local path."""
    if source.startswith(ARTIFACT_SCHEME):
        if found := artifact_of(source, store):
            return store.get_dir(found[0]) / found[1]
        raise ArtifactNotFoundError(f"{what}: {source}: no artifact in {store.root_uri} holds this path")
    path = Path(source)
    if not path.exists():
        raise ArtifactNotFoundError(f"{what}: {source}: no such file or directory")
    return path


def validate_key(key: str, *, what: str = "artifact key") -> str:
    """Return ``key`` if it is a safe relative path; raise :class:`InvalidKeyError` naming the problem."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid {what} {key!r}: it is empty")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise InvalidKeyError(f"invalid {what} {key!r}: absolute paths are not allowed, use a relative key")
    if "\\" in key or any(ord(ch) < 32 for ch in key):
        raise InvalidKeyError(f"invalid {what} {key!r}: backslashes and control characters are not allowed")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidKeyError(f"invalid {what} {key!r}: empty path segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise InvalidKeyError(f"invalid {what} {key!r}: '{segment}' segments are not allowed")
    return key


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _scan_dir(local: Path) -> list[FileEntry]:
    if not local.is_dir():
        raise ArtifactError(f"{local}: not a directory")
    entries = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if rel == MANIFEST_NAME:
            raise ArtifactError(f"{path}: '{MANIFEST_NAME}' is reserved for the store's manifest")
        digest, size = _hash_file(path)
        entries.append(FileEntry(rel, size, digest))
    return entries


def _manifest_bytes(
    entries: list[FileEntry], objects: dict[str, str] | None = None, stale: list[str] | None = None
) -> bytes:
    """The manifest: every file's path, size and sha256, and — only while an overwrite is being switched in — where
    each file's object lies (relative to the key) and which objects of the replaced version are left to delete.
    Deterministic: the same files give the same manifest; the content's sha256 is over the files alone
    (:func:`_content_sha256`)."""
    body: dict[str, Any] = {"format": MANIFEST_FORMAT, "files": [e.__dict__ for e in entries]}
    if objects:
        body["objects"], body["stale"] = objects, sorted(stale or [])
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _content_sha256(entries: list[FileEntry]) -> str:
    """What identifies an artifact: the sha256 of its manifest without object locations."""
    return hashlib.sha256(_manifest_bytes(entries)).hexdigest()


def tree_sha256(local: Path) -> str:
    """The sha256 a directory gets as an artifact (its manifest's hash), computed without uploading it."""
    return hashlib.sha256(_manifest_bytes(_scan_dir(local))).hexdigest()


def file_sha256s(local: Path) -> dict[str, str]:
    """Each file's sha256 by its path relative to ``local``."""
    return {entry.path: entry.sha256 for entry in _scan_dir(local)}


def _parse_manifest(raw: bytes, where: str) -> tuple[list[FileEntry], dict[str, str], list[str]]:
    """The files a manifest lists, where each one's object lies (its path unless the manifest says otherwise), and
    the objects a switched-in overwrite has still to delete."""
    try:
        body = json.loads(raw)
        if body.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {body.get('format')!r}")
        entries = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in body["files"]]
        moved = {str(k): str(v) for k, v in body.get("objects", {}).items()}
        stale = [str(k) for k in body.get("stale", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactIntegrityError(f"{where}: unreadable manifest ({exc})") from None
    for entry in entries:
        validate_key(entry.path, what=f"path in {where}")
    for obj in [*moved.values(), *stale]:
        validate_key(obj, what=f"object in {where}")
    return entries, {e.path: moved.get(e.path, e.path) for e in entries}, stale


class Backend(Protocol):
    """The few primitive operations a storage backend provides; keys are store-relative."""

    root_uri: str

    def uri(self, key: str) -> str: ...
    def upload_file(self, local: Path, key: str) -> None: ...
    def download_file(self, key: str, local: Path) -> None: ...
    def read_bytes(self, key: str) -> bytes | None: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def modified_at(self, key: str) -> datetime: ...
    def delete(self, key: str) -> None: ...
    def iter_keys(self, prefix: str) -> Iterator[str]: ...


class LocalBackend:
    """Files under a root directory; writes go through a temporary file and an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root_uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        """The file for ``key``; a symlink under the root may not lead out of it."""
        path = self.root / key
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKeyError(f"{path} leads out of the store's root {self.root} (a symlink)")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def _atomic_write(self, key: str, write: Any) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def upload_file(self, local: Path, key: str) -> None:
        with local.open("rb") as src:
            self._atomic_write(key, lambda dst: shutil.copyfileobj(src, dst, _CHUNK))

    def download_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self._path(key), local)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda fh: fh.write(data))

    def modified_at(self, key: str) -> datetime:
        return datetime.fromtimestamp(self._path(key).stat().st_mtime, tz=UTC)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def iter_keys(self, prefix: str) -> Iterator[str]:
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root  # walk the prefix's folder only
        if not start.exists():
            return
        for path in start.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            if rel.startswith(prefix) and path.is_file() and not path.name.startswith(".tmp-"):
                yield rel


class S3Backend:
    """Objects under ``s3://bucket/prefix`` through boto3; large files go multipart via the transfer manager."""

    def __init__(self, bucket: str, prefix: str, client: Any, *, multipart_threshold: int = 8 << 20) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.root_uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold, max_concurrency=4
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def upload_file(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer)

    def download_file(self, key: str, local: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def modified_at(self, key: str) -> datetime:
        return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["LastModified"]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def iter_keys(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]


class ArtifactStore:
    """Put and get whole directories with a manifest written last and verified on the way back."""

    def __init__(self, backend: Backend, cache_dir: Path) -> None:
        self.backend = backend
        self.cache_dir = cache_dir.expanduser()

    @property
    def root_uri(self) -> str:
        return self.backend.root_uri

    def put_dir(self, local: Path, key: str, *, overwrite: bool = False) -> ArtifactRef:
        """Upload every file under ``local`` to ``key``, then its manifest; return the ref.

        Putting identical content again returns the existing ref without uploading. Different content
        at an existing key raises :class:`ArtifactExistsError` unless ``overwrite`` is set. An overwrite writes
        the new files beside the old ones (under ``.v/<sha256>/``), then switches the manifest in one write, then
        moves them to their plain paths: interrupted at any point, the key holds the old artifact or the new one,
        both whole.
        """
        validate_key(key)
        entries = _scan_dir(Path(local))
        manifest = _manifest_bytes(entries)
        digest = _content_sha256(entries)
        manifest_key = f"{key}/{MANIFEST_NAME}"
        existing = self.backend.read_bytes(manifest_key)
        if existing is not None:
            old_entries, old_objects, old_stale = _parse_manifest(existing, self.backend.uri(manifest_key))
            same = _content_sha256(old_entries) == digest
            if same and existing == manifest:
                return self.ref(key)
            if not same and not overwrite:
                raise ArtifactExistsError(
                    f"{self.backend.uri(key)} already holds a different artifact; pass overwrite=True to replace it"
                )
            # (same content but objects elsewhere: an overwrite of this very content was interrupted; finish it)
            stale = ({*old_objects.values(), *old_stale}) - {e.path for e in entries}
            if not same:
                staged = {e.path: f".v/{digest[:16]}/{e.path}" for e in entries}
                for entry in entries:
                    self.backend.upload_file(Path(local) / entry.path, f"{key}/{staged[entry.path]}")
                stale -= set(staged.values())
                self.backend.write_bytes(manifest_key, _manifest_bytes(entries, staged, sorted(stale)))  # the switch
                stale |= set(staged.values())
        else:
            stale = set()
        for entry in entries:
            self.backend.upload_file(Path(local) / entry.path, f"{key}/{entry.path}")
        self.backend.write_bytes(manifest_key, manifest)
        for obj in sorted(stale):  # what no manifest names any more
            self.backend.delete(f"{key}/{obj}")
        return ArtifactRef(
            uri=self.backend.uri(key),
            key=key,
            sha256=digest,
            size=sum(e.size for e in entries),
            created_at=self.backend.modified_at(manifest_key),
        )

    def exists(self, key: str) -> bool:
        """True if a complete artifact (with its manifest) is at ``key``."""
        validate_key(key)
        return self.backend.read_bytes(f"{key}/{MANIFEST_NAME}") is not None

    def ref(self, key: str) -> ArtifactRef:
        """The ref of the complete artifact at ``key``; :class:`ArtifactNotFoundError` if there is none."""
        validate_key(key)
        manifest_key = f"{key}/{MANIFEST_NAME}"
        raw = self.backend.read_bytes(manifest_key)
        if raw is None:
            raise ArtifactNotFoundError(f"no complete artifact at {self.backend.uri(key)} (no manifest)")
        entries, _, _ = _parse_manifest(raw, self.backend.uri(manifest_key))
        return ArtifactRef(
            uri=self.backend.uri(key),
            key=key,
            sha256=_content_sha256(entries),
            size=sum(e.size for e in entries),
            created_at=self.backend.modified_at(manifest_key),
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of every complete artifact under ``prefix`` (a directory prefix), sorted; one listing, no reads."""
        if prefix:
            validate_key(prefix.rstrip("/"), what="prefix")
        suffix = f"/{MANIFEST_NAME}"
        return sorted(k[: -len(suffix)] for k in self.backend.iter_keys(prefix.rstrip("/")) if k.endswith(suffix))

    def list(self, prefix: str = "") -> list[ArtifactRef]:
        """Refs of every complete artifact whose key starts with ``prefix`` (a directory prefix)."""
        return [self.ref(key) for key in self.keys(prefix)]

    def get_dir(self, ref: ArtifactRef | str) -> Path:
        """Download the artifact into the cache, verify every file, and return the local directory.

        The directory appears in the cache only after every sha256 matched, so a cached copy is
        always a verified one. Raises :class:`ArtifactIntegrityError` naming the file that differs.
        """
        if isinstance(ref, str):
            ref = self.ref(ref)
        validate_key(ref.key)
        if ref.uri != self.backend.uri(ref.key):
            raise ArtifactError(f"{ref.uri} is not in this store ({self.root_uri})")
        if not _SHA256.fullmatch(ref.sha256):  # a ref built without validation (model_construct, model_copy)
            raise ArtifactError(f"{ref.sha256!r} is not a sha256; refusing to use it as a cache path")
        target = self.cache_dir / "artifacts" / ref.sha256
        if target.is_dir():
            return target
        manifest_key = f"{ref.key}/{MANIFEST_NAME}"
        raw = self.backend.read_bytes(manifest_key)
        if raw is None:
            raise ArtifactNotFoundError(f"no complete artifact at {ref.uri} (no manifest)")
        entries, objects, _ = _parse_manifest(raw, self.backend.uri(manifest_key))
        if _content_sha256(entries) != ref.sha256:
            raise ArtifactIntegrityError(f"{self.backend.uri(manifest_key)}: manifest changed since the ref was made")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            for entry in entries:
                dest = staging / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.backend.download_file(f"{ref.key}/{objects[entry.path]}", dest)
                digest, size = _hash_file(dest)
                if digest != entry.sha256 or size != entry.size:
                    raise ArtifactIntegrityError(
                        f"{self.backend.uri(f'{ref.key}/{objects[entry.path]}')}: sha256 mismatch "
                        f"(manifest {entry.sha256[:12]}… {entry.size} B, downloaded {digest[:12]}… {size} B)"
                    )
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # a concurrent get_dir won the race otherwise
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def make_s3_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client with bounded time-outs and retries, pointed at ``endpoint_url`` when set."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=3,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 4},
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def check_s3(client: Any, bucket: str, endpoint_url: str | None) -> None:
    """Fail with one :class:`SettingsError` line when credentials are missing or the bucket is unreachable."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint_url or "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise SettingsError(
            f"no AWS credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except EndpointConnectionError:
        raise SettingsError(
            f"cannot reach the S3 endpoint {where} (TUNESHIP_S3_ENDPOINT_URL / AWS_ENDPOINT_URL): connection failed"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        reason = {"404": "does not exist", "NoSuchBucket": "does not exist", "403": "access denied"}.get(code, code)
        raise SettingsError(f"bucket s3://{bucket} at {where}: {reason}") from None
    except BotoCoreError as exc:
        raise SettingsError(f"S3 endpoint {where}: {exc}") from None


def open_store(settings: Settings, *, check: bool = True) -> ArtifactStore:
    """Build the artifact store named by ``settings.artifact_root``; with ``check``, verify S3 access now."""
    root = settings.artifact_root
    cache = settings.cache_dir
    if root.startswith("s3://"):
        parts = urlsplit(root)
        client = make_s3_client(settings.s3_endpoint_url)
        if check:
            check_s3(client, parts.netloc, settings.s3_endpoint_url)
        return ArtifactStore(S3Backend(parts.netloc, parts.path, client), cache)
    path = Path(urlsplit(root).path) if root.startswith("file://") else Path(root)
    return ArtifactStore(LocalBackend(path), cache)


__all__ = [
    "MANIFEST_NAME",
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactIntegrityError",
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactStore",
    "InvalidKeyError",
    "LocalBackend",
    "S3Backend",
    "check_s3",
    "make_s3_client",
    "open_store",
    "validate_key",
]
