"""The bundle ``NAME.ammo/``: a stacked ensemble, its threshold and everything to run it.

```
NAME.ammo/
  manifest.json      format version, task, classes, threshold, objective, preprocessing,
                     members (builder, hyperparameters, inputs), meta-learner, validation
                     metrics with n and intervals, sha256 of every other file, versions
  members/*.keras    the member models (Keras v3 format)
  meta.npz           the meta-learner's fitted parameters as plain arrays
  oof.npz            the ensemble's out-of-fold probabilities and decisions on the stacking
                     rows, what its validation metrics were computed from (plain arrays)
```

A bundle is written into a temporary directory and renamed when complete. Loading refuses,
with a ``BundleError`` that says why: an unknown format version; a path in the manifest
that is absolute or leaves the bundle; a file missing, unlisted or whose sha256 differs; a
member whose config holds a ``Lambda`` or refers to code outside Keras and the installed
plugins (checked before Keras reads it, then loaded with ``safe_mode=True``); a meta file
that is not a pickle-free ``.npz``. Nothing in a bundle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from automammo import registry
from automammo.atomic import atomic_dir, write_json
from automammo.errors import AutomammoError, BundleError
from automammo.meta import MetaLearner
from automammo.objectives import predict_classes
from automammo.preprocess import Preprocessing

FORMAT = "automammo-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_MEMBER_ENTRIES = {"config.json", "metadata.json", "model.weights.h5"}
_SAFE_PACKAGES = {"keras"}


# -- writing ------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle(out, manifest: dict, members: list[tuple[Path, str]], meta: MetaLearner,
                 check=None, arrays: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """Write a bundle atomically.

    Args:
        out: the bundle directory to create or replace (``NAME.ammo``).
        manifest: every manifest field except ``format``, ``format_version``, ``files`` and
            ``meta_learner.file``; ``members[i]["file"]`` must be the destination names.
        members: (source .keras file, destination relative path) per member.
        meta: the fitted meta-learner.
        check: optional ``check(bundle)`` run on the loaded temporary bundle before it is
            renamed into place; raise to abandon the export.
        arrays: further ``.npz`` files to write, by relative path (``{"oof.npz": {...}}``).

    Returns:
        The bundle path.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        for src, dest in members:
            target = tmp / _safe_relpath(dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        np.savez(tmp / "meta.npz", **meta.to_arrays())
        for name, content in (arrays or {}).items():
            np.savez(tmp / _safe_relpath(name), **content)
        files = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
        full["meta_learner"] = {**manifest["meta_learner"], "name": meta.name, "file": "meta.npz"}
        write_json(tmp / MANIFEST, full)
        if check is not None:
            check(Bundle.load(tmp))
    return out


# -- reading ------------------------------------------------------------------------------


@dataclass
class Member:
    """One loaded member: its manifest entry, model and preprocessing."""

    spec: dict
    model: object
    preprocessing: Preprocessing
    features: str

    @property
    def pair(self) -> bool:
        return self.spec["inputs"] == "pair"

    def outputs(self, inputs, batch_size: int = 64) -> np.ndarray:
        model = self.model if self.features == "probs" else penultimate_model(self.model)
        out = np.asarray(model.predict(inputs, batch_size=batch_size, verbose=0), dtype=np.float64)
        return out.reshape(len(out), -1)


def penultimate_model(model):
    """The model up to the input of its output layer (what the classifier head sees)."""
    import keras

    cached = getattr(model, "_automammo_penultimate", None)
    if cached is None:
        cached = keras.Model(model.inputs, model.layers[-1].input)
        model._automammo_penultimate = cached
    return cached


class Bundle:
    """A loaded, verified bundle. Use ``Bundle.load(path)``.

    Attributes:
        path: the bundle directory.
        manifest: the parsed manifest.
        members: loaded members, in the manifest's order.
        meta: the meta-learner.
        classes: class names; ``positive`` the positive class index (binary tasks) or None.
        threshold: decision threshold on the positive class (binary tasks) or None.
    """

    def __init__(self, path: Path, manifest: dict, members: list[Member], meta: MetaLearner):
        self.path, self.manifest, self.members, self.meta = path, manifest, members, meta
        task = manifest["task"]
        self.task_name: str = task["name"]
        self.classes: list[str] = list(task["classes"])
        self.positive: int | None = task["positive"]
        self.threshold: float | None = manifest["threshold"]
        self.features: str = manifest["features"]

    @property
    def needs_baseline(self) -> bool:
        return any(m.pair for m in self.members)

    @classmethod
    def load(cls, path) -> "Bundle":
        """Read and verify a bundle (see the module docstring for what is refused)."""
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest)
        meta = _load_meta(path, manifest)
        features = manifest["features"]
        members = []
        for spec in manifest["members"]:
            model = load_member_model(path / _safe_relpath(spec["file"]), spec["file"])
            _check_member(model, spec, len(manifest["task"]["classes"]), features)
            members.append(Member(spec, model, Preprocessing.from_dict(spec["preprocessing"]), features))
        expected = sum(int(m.spec["feature_size"]) for m in members)
        if meta.n_features != expected:
            raise BundleError(f"{path}: the meta-learner takes {meta.n_features} features but the members give {expected}")
        return cls(path, manifest, members, meta)

    # -- prediction ---------------------------------------------------------------------
    def member_features(self, raw_x, raw_baseline=None, batch_size: int = 64) -> np.ndarray:
        """(N, F) member outputs for raw patches (the stored preprocessing is applied).

        Args:
            raw_x: (N, H, W) raw patches, or a sequence of 2-D patches of any sizes.
            raw_baseline: the baseline partners in the same form, for pair members.
        """
        if self.needs_baseline and raw_baseline is None:
            raise BundleError(f"{self.path}: this bundle compares each lesion with its baseline patch; "
                              "give the baselines (--baseline)")
        prepared: dict[Preprocessing, tuple] = {}
        outputs = []
        for member in self.members:
            if member.preprocessing not in prepared:
                x = _prepare(member.preprocessing, raw_x)
                b = _prepare(member.preprocessing, raw_baseline) if raw_baseline is not None else None
                if b is not None and len(b) != len(x):
                    raise BundleError(f"{len(x)} patches but {len(b)} baselines")
                prepared[member.preprocessing] = (x, b)
            x, b = prepared[member.preprocessing]
            inputs = {"lesion": x, "baseline": b} if member.pair else x
            outputs.append(member.outputs(inputs, batch_size))
        return np.concatenate(outputs, axis=1)

    def predict_proba(self, raw_x, raw_baseline=None, batch_size: int = 64) -> np.ndarray:
        """(N, C) class probabilities of the ensemble for raw patches."""
        return self.meta.predict_proba(self.member_features(raw_x, raw_baseline, batch_size))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class index per sample: the bundle's threshold for binary tasks, argmax otherwise."""
        return predict_classes(probs, self.positive, 0.5 if self.threshold is None else self.threshold)


def _prepare(prep: Preprocessing, raw) -> np.ndarray:
    if isinstance(raw, np.ndarray) and raw.ndim in (3, 4):
        return prep.apply(raw)
    images = [np.asarray(img) for img in raw]
    if not images:
        raise AutomammoError("no patches to predict")
    # Patches of one size are preprocessed together (one resize call), then put back in order.
    out = np.empty((len(images), prep.image_size, prep.image_size, 1), dtype=np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    for idx in by_shape.values():
        out[idx] = prep.apply(np.stack([images[i] for i in idx]))
    return out


# -- verification ----------------------------------------------------------------------------


def _safe_relpath(name) -> Path:
    """A manifest path as a relative path that stays inside the bundle, or BundleError."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise BundleError(f"manifest path {name!r} is not a plain relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("~") or ":" in pure.parts[0] or ".." in pure.parts or "." in pure.parts:
        raise BundleError(f"manifest path {name!r} points outside the bundle")
    return Path(*pure.parts)


def _resolve_inside(root: Path, name: str) -> Path:
    path = root / _safe_relpath(name)
    # A symbolic link could still lead out of the bundle.
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {name} resolves outside the bundle")
    return path


def read_manifest(path: Path) -> dict:
    """Parse and check the manifest's structure and format version."""
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle")
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: implausibly large manifest")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{mpath}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not an automammo bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(f"{path}: bundle format version {version!r} is not supported "
                          f"(this automammo reads version {FORMAT_VERSION}); upgrade automammo")
    try:
        _check_structure(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise BundleError(f"{mpath}: malformed manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def _check_structure(m: dict) -> None:
    def need(cond, what):
        if not cond:
            raise ValueError(what)

    task = m["task"]
    need(isinstance(task, dict) and isinstance(task["name"], str), "task.name")
    classes = task["classes"]
    need(isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes), "task.classes")
    pos = task["positive"]
    need(pos is None or (type(pos) is int and 0 <= pos < len(classes)), "task.positive")
    t = m["threshold"]
    need(t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0 + 1e-6),
         "threshold")
    need(t is None or (pos is not None and len(classes) == 2), "threshold needs a binary task")
    need(m["features"] in ("probs", "penultimate"), "features")
    files = m["files"]
    need(isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                         for k, v in files.items()), "files")
    members = m["members"]
    need(isinstance(members, list) and members, "members")
    for spec in members:
        need(isinstance(spec, dict) and isinstance(spec["file"], str) and spec["file"].endswith(".keras"),
             "members[].file")
        need(spec["inputs"] in ("single", "pair"), "members[].inputs")
        need(type(spec["feature_size"]) is int and spec["feature_size"] > 0, "members[].feature_size")
        prep = Preprocessing.from_dict(spec["preprocessing"])
        need(8 <= prep.image_size <= 4096 and prep.scale_max > 0, "members[].preprocessing")
    meta = m["meta_learner"]
    need(isinstance(meta, dict) and isinstance(meta["name"], str) and isinstance(meta["file"], str), "meta_learner")


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file exists inside the bundle with its sha256; nothing else is there."""
    listed = manifest["files"]
    for name in listed:
        _safe_relpath(name)
    for spec in manifest["members"]:
        _safe_relpath(spec["file"])
    _safe_relpath(manifest["meta_learner"]["file"])
    for name in [s["file"] for s in manifest["members"]] + [manifest["meta_learner"]["file"]]:
        if name not in listed:
            raise BundleError(f"{path}: {name} has no sha256 in the manifest")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(listed) - {MANIFEST})
    if extra:
        raise BundleError(f"{path}: {extra[0]} is not listed in the manifest (tampered or incomplete bundle)")
    for name, digest in listed.items():
        file = _resolve_inside(path, name)
        if not file.is_file():
            raise BundleError(f"{path}: {name} is missing")
        if sha256(file) != digest.lower():
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest (modified or corrupted)")


OOF_ARRAYS = ("rows", "y_true", "y_prob", "decisions", "groups")


def read_oof(path: Path, manifest: dict) -> dict[str, np.ndarray] | None:
    """The ensemble's stored out-of-fold predictions, checked; None for a bundle without them.

    Call :func:`verify_files` first: this checks the arrays' shapes, not the file's hash.
    """
    spec = manifest.get("oof")
    if not spec:
        return None
    path = Path(path)
    name = spec.get("file") if isinstance(spec, dict) else None
    if not isinstance(name, str) or name not in manifest["files"]:
        raise BundleError(f"{path}: the out-of-fold file {name!r} is not listed in the manifest")
    file = _resolve_inside(path, name)
    try:
        with np.load(file, allow_pickle=False) as z:
            out = {k: z[k] for k in OOF_ARRAYS}
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{file}: not the out-of-fold arrays {', '.join(OOF_ARRAYS)} ({exc})") from None
    n, k = len(out["rows"]), len(manifest["task"]["classes"])
    if out["y_prob"].shape != (n, k) or any(out[a].shape != (n,) for a in ("y_true", "decisions", "groups")):
        raise BundleError(f"{file}: arrays of inconsistent shapes (rows {n}, probabilities {out['y_prob'].shape})")
    for a in ("rows", "y_true", "decisions"):
        if out[a].dtype.kind not in "iu":
            raise BundleError(f"{file}: {a} must be integers, not {out[a].dtype}")
    return out


def _load_meta(path: Path, manifest: dict) -> MetaLearner:
    spec = manifest["meta_learner"]
    table = registry.meta_learners()
    if spec["name"] not in table:
        raise BundleError(f"{path}: meta-learner {spec['name']!r} is not installed; "
                          f"known: {', '.join(sorted(table)) or '(none)'}")
    file = _resolve_inside(path, spec["file"])
    if file.suffix != ".npz":
        raise BundleError(f"{path}: meta-learner file {spec['file']} is not a .npz of plain arrays")
    try:
        with np.load(file, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise BundleError(f"{path}: {spec['file']} is a single array, not a .npz archive")
            arrays = {k: npz[k] for k in npz.files}
    except BundleError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise BundleError(f"{path}: {spec['file']} holds pickled data; automammo never loads pickle") from None
        raise BundleError(f"{path}: {spec['file']} is not a valid .npz ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - zip and format errors of a damaged file
        raise BundleError(f"{path}: {spec['file']} is unreadable ({type(exc).__name__}: {exc})") from None
    learner = table[spec["name"]].from_arrays(arrays)
    if learner.n_classes != len(manifest["task"]["classes"]):
        raise BundleError(f"{path}: the meta-learner has {learner.n_classes} classes, the task "
                          f"{len(manifest['task']['classes'])}")
    return learner


def check_member_file(file: Path, name: str) -> None:
    """Refuse a .keras archive that could run code when Keras deserialises it.

    Keras' ``safe_mode`` already refuses Lambda layers and imports outside Keras; this check
    runs first so the message is specific and no Keras code touches a hostile config.
    """
    try:
        with zipfile.ZipFile(file) as zf:
            entries = zf.namelist()
            bad = [e for e in entries if e not in _MEMBER_ENTRIES and not e.startswith("assets/")]
            if bad or "config.json" not in entries:
                raise BundleError(f"member {name}: unexpected archive content {bad[:3] or '(no config.json)'}")
            for e in entries:
                _safe_relpath(e.rstrip("/"))
            config = json.loads(zf.read("config.json").decode("utf-8"))
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip / JSON errors of a damaged member
        raise BundleError(f"member {name}: not a readable .keras model ({type(exc).__name__}: {exc})") from None
    import keras

    registered = set(keras.saving.get_custom_objects())
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        stack.extend(node.values())
        cls_name = node.get("class_name")
        if cls_name == "Lambda" or cls_name == "__lambda__":
            raise BundleError(f"member {name}: contains a Lambda layer (arbitrary Python code); refused")
        module = node.get("module")
        if isinstance(module, str) and module.split(".")[0] not in _SAFE_PACKAGES:
            if node.get("registered_name") not in registered:
                raise BundleError(f"member {name}: refers to code outside Keras and the installed plugins "
                                  f"({module}.{cls_name}); refused")


def load_member_model(file: Path, name: str):
    """Load a member with ``safe_mode=True`` after ``check_member_file``."""
    # Plugins register their custom layers when imported; load them before Keras looks.
    # automammo.layers is imported directly so that pair members load even if a plugin fails.
    import automammo.layers  # noqa: F401

    registry.builders()
    check_member_file(file, name)
    import keras

    try:
        return keras.saving.load_model(file, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"member {name}: cannot be loaded safely ({type(exc).__name__}: {first})") from None


def _check_member(model, spec: dict, n_classes: int, features: str) -> None:
    names = sorted(getattr(t, "name", "").split(":")[0] for t in model.inputs)
    want = ["baseline", "lesion"] if spec["inputs"] == "pair" else None
    if want is not None and names != want:
        raise BundleError(f"member {spec['file']}: a pair member needs inputs 'lesion' and 'baseline', has {names}")
    if want is None and len(model.inputs) != 1:
        raise BundleError(f"member {spec['file']}: a single member needs one input, has {len(model.inputs)}")
    if tuple(model.outputs[0].shape[1:]) != (n_classes,):
        raise BundleError(f"member {spec['file']}: outputs {tuple(model.outputs[0].shape[1:])}, "
                          f"expected {n_classes} class probabilities")
    size = int(spec["preprocessing"]["image_size"])
    for t in model.inputs:
        if tuple(t.shape[1:]) != (size, size, 1):
            raise BundleError(f"member {spec['file']}: input {tuple(t.shape[1:])} disagrees with image size {size}")
    width = n_classes if features == "probs" else int(np.prod(model.layers[-1].input.shape[1:]))
    if width != spec["feature_size"]:
        raise BundleError(f"member {spec['file']}: gives {width} features, manifest says {spec['feature_size']}")


def versions() -> dict[str, str]:
    """Package versions recorded in a bundle."""
    from automammo.search import versions as search_versions

    return search_versions()


def bundle_path(path) -> Path:
    """``NAME`` -> ``NAME.ammo``: bundles always carry the suffix so tools recognise them."""
    path = Path(os.fspath(path))
    return path if path.suffix == ".ammo" else path.with_name(path.name + ".ammo")
