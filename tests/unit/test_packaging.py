"""The wheel and the image hold the operator only: no emulator, demo or other test code.

The wheel is built offline with the installed build backend (hatchling, in the `test` extra),
twice: from the checkout (what `pip install .` ships) and from exactly what operator/Dockerfile
copies into its build stage (what the image installs; its final stage copies only that venv).
"""

from __future__ import annotations

import email.parser
import re
import shlex
import shutil
import zipfile
from pathlib import Path

import pytest

hatchling_build = pytest.importorskip("hatchling.build")

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "zenml_operator"
DOCKERFILE = ROOT / "operator" / "Dockerfile"
# The development stack and what only it (or the tests) may import.
DEV_ONLY = ("zenml_devstack", "kmock", "attrs", "jsonpatch", "jsonpointer", "pytest")
DEV_IMPORT = re.compile(rf"^\s*(?:from|import)\s+({'|'.join(DEV_ONLY)})\b", re.MULTILINE)
DEV_NAMES = ("devstack", "demo", "emulator", "kopf_runner", "zenml_server", "dicts", "test")


def _build_wheel(source: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out.mkdir()
    with monkeypatch.context() as m:
        m.chdir(source)  # the PEP 517 hooks build the project in the working directory
        name = hatchling_build.build_wheel(str(out))
    return out / name


def _product_sources() -> set[str]:
    return {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts
    }


def _check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        sources = {n: zf.read(n).decode() for n in names if n.endswith(".py")}
        metadata = email.parser.Parser().parsestr(
            zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
    dist_info = {n for n in names if ".dist-info/" in n}
    assert {n.split("/")[0] for n in dist_info} == {"zenml_operator-0.1.0.dist-info"}
    assert {n.split("/", 1)[1] for n in dist_info} <= {
        "METADATA",
        "WHEEL",
        "RECORD",
        "entry_points.txt",
    }
    # Exactly the product package's modules, nothing beside them.
    assert names - dist_info == _product_sources()
    offenders = [n for n in names if any(word in n for word in DEV_NAMES)]
    assert not offenders, f"development code in the wheel: {offenders}"
    imports = {n: DEV_IMPORT.findall(text) for n, text in sources.items()}
    assert not {n: found for n, found in imports.items() if found}, "imports dev-only modules"
    # The installed operator needs none of the development stack's dependencies.
    runtime = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert runtime, "no runtime dependencies read from METADATA"
    leaked = [r for r in runtime if re.match(rf"({'|'.join(DEV_ONLY)})\b", r)]
    assert not leaked, f"development dependencies required at run time: {leaked}"


def test_wheel_holds_exactly_the_product_package(tmp_path, monkeypatch) -> None:
    _check_wheel(_build_wheel(ROOT, tmp_path / "dist", monkeypatch))


def _dockerfile_build_copies() -> list[str]:
    """The sources of the build stage's COPY lines (the final stage copies only the venv)."""
    stages: list[list[str]] = []
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if not line.startswith(("FROM", "COPY")):
            continue
        words = shlex.split(line)
        if words[:1] == ["FROM"]:
            stages.append([])
        elif words[:1] == ["COPY"]:
            args = [w for w in words[1:] if not w.startswith("--")]
            stages[-1].extend(args[:-1])  # the last argument is the destination
    build, final = stages
    assert final == ["/opt/zenml-operator"], "the final stage copies anything but the venv"
    return build


def test_image_copies_only_the_product(tmp_path, monkeypatch) -> None:
    sources = _dockerfile_build_copies()
    assert sorted(sources) == ["README.md", "operator/zenml_operator", "pyproject.toml"]
    context = tmp_path / "context"
    for source in sources:
        src, dst = ROOT / source, context / source
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    # What `pip install .` builds in the image's build stage: the same product-only wheel.
    _check_wheel(_build_wheel(context, tmp_path / "dist", monkeypatch))


def test_cli_demo_points_at_make_demo(capsys) -> None:
    from zenml_operator.cli import main

    assert main(["demo", "--keep-running", "-v"]) == 2
    assert "make demo" in capsys.readouterr().err
