"""The model registry: versioned cluster models in a folder or any Beam FileSystems path (gs://...).

    <root>/versions/<version>/model.joblib     the fitted scikit-learn Pipeline
                              portable.json    what scoring needs, as arrays (`PortableModel`)
                              metadata.json    features, library versions, training window,
                                               metrics, clusters, and the two files' sha256
    <root>/promoted.json      the version every path assigns with, the sha256 of its metadata,
                              and the promotions before it (what `rollback` returns to)
    <root>/shadow.json        a candidate scored beside the promoted model, assigning nothing

Readers follow the pointers, never "the newest file": a rollback or a shadow is a pointer move.
Every load checks the chain of checksums (pointer -> metadata -> file) before it parses, and
never unpickles a file whose checksum does not match (`ModelIntegrityError`). Pointers are
written to a temporary name and renamed over the old one, so a reader sees the old pointer or
the new one.

`cdpflow models list|show|promote|rollback|shadow --registry PATH` (cli.py) drive it.
"""
from __future__ import annotations

import hashlib
import io
import time
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import orjson

from cdpflow.core.clusters import PortableModel, feature_vector
from cdpflow.core.follow import Followed
from cdpflow.errors import BadInput

FILES = ("model.joblib", "portable.json")


class ModelIntegrityError(BadInput):
    """A stored model's bytes do not match the checksum recorded for them: refused."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ModelRegistry:
    def __init__(self, root: str):
        from apache_beam.io.filesystems import FileSystems
        self.fs = FileSystems
        self.root = root.rstrip("/") or "/"

    # ------------------------------------------------------------------ bytes
    def _path(self, *parts: str) -> str:
        return self.fs.join(self.root, *parts)

    def _read(self, path: str) -> bytes:
        with self.fs.open(path, compression_type="uncompressed") as handle:
            return handle.read()

    def _write(self, path: str, data: bytes) -> None:
        # Renamed over the old file, never deleted first: a reader sees the old pointer or the new
        # one, never none (a local rename replaces atomically; on GCS a rename is a copy, which
        # replaces the object whole).
        temporary = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.create(temporary, compression_type="uncompressed") as handle:
            handle.write(data)
        self.fs.rename([temporary], [path])

    def _exists(self, path: str) -> bool:
        return self.fs.exists(path)

    # ------------------------------------------------------------------ versions
    def save(self, pipeline, portable: PortableModel, metadata: Mapping[str, Any]) -> Dict[str, Any]:
        """Stores a new version (its files, then its metadata with their checksums); returns the metadata."""
        import joblib
        version = portable.version
        if self._exists(self._path("versions", version, "metadata.json")):
            raise BadInput(f"model version {version} is already in the registry {self.root}")
        buffer = io.BytesIO()
        joblib.dump(pipeline, buffer)
        blobs = {"model.joblib": buffer.getvalue(), "portable.json": orjson.dumps(portable.to_dict())}
        for name, data in blobs.items():
            self._write(self._path("versions", version, name), data)
        meta = dict(metadata, version=version, checksums={name: _sha256(data) for name, data in blobs.items()})
        self._write(self._path("versions", version, "metadata.json"), orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        return meta

    def versions(self) -> List[Dict[str, Any]]:
        """Every stored version's metadata, oldest first."""
        found = self.fs.match([self._path("versions", "*", "metadata.json")])[0].metadata_list
        metas = [orjson.loads(self._read(m.path)) for m in found]
        return sorted(metas, key=lambda m: (m.get("trained_at", ""), m["version"]))

    def metadata(self, version: str, expected_sha256: Optional[str] = None) -> Dict[str, Any]:
        path = self._path("versions", version, "metadata.json")
        if not self._exists(path):
            raise BadInput(f"no model version {version!r} in the registry {self.root}")
        data = self._read(path)
        if expected_sha256 is not None and _sha256(data) != expected_sha256:
            raise ModelIntegrityError(f"model {version}: metadata.json does not match the checksum the pointer "
                                      "recorded; refusing it")
        return orjson.loads(data)

    def _verified(self, version: str, name: str, expected_metadata: Optional[str] = None) -> bytes:
        meta = self.metadata(version, expected_metadata)
        data = self._read(self._path("versions", version, name))
        if _sha256(data) != meta["checksums"][name]:
            raise ModelIntegrityError(f"model {version}: {name} does not match its recorded sha256; refusing to load it")
        return data

    def load_portable(self, version: str, expected_metadata: Optional[str] = None) -> PortableModel:
        return PortableModel.from_dict(orjson.loads(self._verified(version, "portable.json", expected_metadata)))

    def load_pipeline(self, version: str, expected_metadata: Optional[str] = None):
        """The scikit-learn Pipeline, unpickled only after its checksum matched."""
        import joblib
        return joblib.load(io.BytesIO(self._verified(version, "model.joblib", expected_metadata)))

    # ------------------------------------------------------------------ pointers
    def _pointer(self, name: str) -> Optional[Dict[str, Any]]:
        path = self._path(name)
        return orjson.loads(self._read(path)) if self._exists(path) else None

    def promoted(self) -> Optional[Dict[str, Any]]:
        """{"version", "metadata_sha256", "promoted_at", "history"} or None."""
        return self._pointer("promoted.json")

    def shadow(self) -> Optional[Dict[str, Any]]:
        return self._pointer("shadow.json")

    def _pointer_to(self, version: str) -> Dict[str, Any]:
        data = self._read(self._path("versions", version, "metadata.json")) if self._exists(
            self._path("versions", version, "metadata.json")) else None
        if data is None:
            raise BadInput(f"no model version {version!r} in the registry {self.root}")
        self.load_portable(version, _sha256(data))  # refuses a version whose files do not match
        return {"version": version, "metadata_sha256": _sha256(data), "at": _now()}

    def promote(self, version: str) -> Dict[str, Any]:
        current = self.promoted()
        pointer = self._pointer_to(version)
        history = list((current or {}).get("history") or [])
        if current is not None:
            history.append({k: current[k] for k in ("version", "metadata_sha256", "at")})
        pointer["history"] = history
        self._write(self._path("promoted.json"), orjson.dumps(pointer, option=orjson.OPT_INDENT_2))
        return pointer

    def rollback(self) -> Dict[str, Any]:
        """Promotes again the version promoted before the current one."""
        current = self.promoted()
        if not current or not current.get("history"):
            raise BadInput("nothing to roll back to: no earlier promotion in this registry")
        history = list(current["history"])
        back = history.pop()
        self.load_portable(back["version"], back["metadata_sha256"])
        pointer = dict(back, at=_now(), history=history, rolled_back_from=current["version"])
        self._write(self._path("promoted.json"), orjson.dumps(pointer, option=orjson.OPT_INDENT_2))
        return pointer

    def set_shadow(self, version: Optional[str]) -> Optional[Dict[str, Any]]:
        """Scores `version` beside the promoted model (None: stops shadowing)."""
        path = self._path("shadow.json")
        if version is None:
            if self._exists(path):
                self.fs.delete([path])
            return None
        pointer = self._pointer_to(version)
        self._write(path, orjson.dumps(pointer, option=orjson.OPT_INDENT_2))
        return pointer

    def promoted_model(self) -> Optional[PortableModel]:
        """The promoted model, checked from its pointer down (None when nothing is promoted)."""
        pointer = self.promoted()
        if pointer is None:
            return None
        return self.load_portable(pointer["version"], pointer["metadata_sha256"])


def registry_for(config: Mapping[str, Any], warehouse: Optional[str] = None) -> Optional[str]:
    """The registry a command uses: `models.registry` in the configuration, else `<warehouse>.models`
    beside an embedded warehouse when that folder exists, else None."""
    import os

    from cdpflow.warehouse.base import companion_path
    configured = (config.get("models") or {}).get("registry")
    if configured:
        return str(configured)
    if warehouse:
        beside = companion_path(warehouse, ".models")
        if os.path.isdir(beside):
            return beside
    return None


def default_registry(warehouse: str) -> str:
    """Where `cdpflow train` stores models when neither --registry nor `models.registry` says."""
    from cdpflow.warehouse.base import companion_path
    return companion_path(warehouse, ".models")


def promoted_document(registry: Optional[str]) -> Optional[Dict[str, Any]]:
    """The promoted model's portable form, checked (None without a registry or a promotion)."""
    if not registry:
        return None
    model = ModelRegistry(registry).promoted_model()
    return model.to_dict() if model is not None else None


class Scorer:
    """One loaded model version: its portable form, and (where it is loaded) its scikit-learn Pipeline.

    `scores(rows)` gives the same n x k matrix whichever does the work (squared centroid distances
    for KMeans, component probabilities for a mixture; a test checks they agree): the Beam stream
    scores with the Pipeline it unpickled (after its checksum matched), the Flink job and the API
    with the arrays.
    """

    def __init__(self, portable: PortableModel, pipeline=None):
        self.portable, self.pipeline, self.version = portable, pipeline, portable.version

    def scores(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        vectors = np.asarray([feature_vector(row, self.portable.features) for row in rows], dtype=float)
        vectors = vectors.reshape(-1, len(self.portable.features))
        if self.pipeline is None:
            return self.portable.scores(vectors)
        if self.portable.algorithm == "kmeans":
            return self.pipeline.transform(vectors) ** 2
        return self.pipeline.predict_proba(vectors)


Models = Tuple[Optional[Scorer], Optional[Scorer]]  # (promoted, shadow)


def score_rows(models: Models, rows: Sequence[Mapping[str, Any]]) -> Optional[List[Dict[str, Any]]]:
    """A batch of profile rows scored by the promoted model, the shadow's scores beside each
    (`PortableModel.scored`, with `shadow`): what a stream's scoring stage attaches as `_clusters`
    (the Beam stream's RunInference and the Flink job's ScoreClusters). None while nothing is promoted."""
    promoted, shadow = models
    if promoted is None:
        return None
    out = [promoted.portable.scored(s) for s in promoted.scores(rows)]
    if shadow is not None:
        for one, s in zip(out, shadow.scores(rows)):
            one["shadow"] = shadow.portable.scored(s)
    return out


def follow_models(registry: str, every_s: float = 10.0, pipelines: bool = False) -> Followed[Models]:
    """The registry's promoted and shadow models, followed: the pointers are re-read at most every
    `every_s` seconds, and a version a pointer moved to (a promotion, a rollback, a new shadow) is
    loaded, its checksums checked from the pointer down. `pipelines`: also unpickle the joblib
    Pipeline (the Beam venv, where it was trained); otherwise the portable arrays only.

    A version that fails its checks keeps the models in force (logged); a registry unreadable
    before anything was loaded raises (`cdpflow.core.follow.Followed`)."""
    store = ModelRegistry(registry)
    loaded: Dict[Tuple[str, str], Scorer] = {}

    def key(pointer):
        return (pointer["version"], pointer["metadata_sha256"]) if pointer else None

    def one(k) -> Optional[Scorer]:
        if k is None:
            return None
        if k not in loaded:
            portable = store.load_portable(*k)
            if len(loaded) > 4:
                loaded.clear()  # a long run's promotions do not pile up
            loaded[k] = Scorer(portable, store.load_pipeline(*k) if pipelines else None)
        return loaded[k]

    return Followed(lambda: (key(store.promoted()), key(store.shadow())),
                    lambda keys: (one(keys[0]), one(keys[1])), every_s, f"model registry {registry}")


class PromotedModel:
    """The promoted model's portable form, followed (`follow_models`): what a long-running service
    (the profile API) assigns with; None while nothing is promoted."""

    def __init__(self, registry: str, every_s: float = 10.0):
        self.followed = follow_models(registry, every_s)

    def get(self) -> Optional[PortableModel]:
        promoted, _ = self.followed.get()
        return promoted.portable if promoted is not None else None
