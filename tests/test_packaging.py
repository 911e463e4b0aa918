"""The package as a user installs it: a wheel holding only ``prefect_kluster`` (its blocks,
tasks, flows and emulator as subpackages), installed into a fresh virtual environment beside a
user project that has its own ``flows`` and ``tasks`` packages, running a flow from there
against the emulator. And the layering rule: importing any tasks module imports no flows."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
from conftest import TEST_API_KEY
from helpers import read_jsonl, requests, write_jsonl
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prefect.settings import PREFECT_API_URL

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("blocks", "tasks", "flows", "emulator")


def _source_tree(dest: Path) -> Path:
    """A copy of what the wheel is built from (the working tree, not just committed files), so
    the build writes its build/ and egg-info into a temporary directory, not the checkout."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {"prefect_kluster", *config["tool"]["setuptools"]["package-dir"].values()}
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in sorted(folders):
        shutil.copytree(ROOT / folder, dest / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built with pip and build isolation: the build backend comes from the configured
    indexes (this machine's are local), not from the test environment."""
    base = tmp_path_factory.mktemp("wheel")
    src = _source_tree(base / "src")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check"]
        + ["-q", "-w", str(base / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (found,) = (base / "dist").glob("prefect_kluster-*.whl")
    return found


def test_wheel_holds_one_import_name_with_its_subpackages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    assert top == {"prefect_kluster", dist_info}, "no top-level blocks/tasks/flows to collide"
    for sub in SUBPACKAGES:
        assert f"prefect_kluster/{sub}/__init__.py" in names
    assert "prefect_kluster/flows/jobs.py" in names
    assert "prefect_kluster/emulator/__main__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "[prefect.collections]\nprefect_kluster = prefect_kluster" in entry_points


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed in it. Third-party dependencies come from the
    test environment through a .pth line (offline and fast); our own package only from the
    wheel (.pth lines in that directory are not run, so its editable hook stays off)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
        + ["-q", "--target", site, str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    (Path(site) / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


@pytest.fixture
def emulator_url(venv: Path) -> Iterator[str]:
    """The emulator from the installed wheel, as a user would start it."""
    proc = subprocess.Popen(
        [str(venv / "bin" / "python"), "-m", "prefect_kluster.emulator", "--port", "0"]
        + ["--api-key", TEST_API_KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(venv),
    )
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        assert first.startswith("emulator listening on "), first + proc.stderr.read()
        yield first.split()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


USER_SCRIPT = """\
import json
import sys

import flows
import tasks
import prefect_kluster
import prefect_kluster.flows
from prefect_kluster import batch_inference

batch_inference(input_path=sys.argv[1], output_path=sys.argv[2])
print(json.dumps({
    "user_flows": [flows.__file__, flows.MY_FLOWS],
    "user_tasks": [tasks.__file__, tasks.MY_TASKS],
    "ours": [prefect_kluster.__file__, prefect_kluster.flows.__file__],
    "top_level": sorted(m for m in sys.modules if m in ("blocks", "emulator")),
}))
"""


def test_a_user_project_with_its_own_flows_and_tasks_runs_our_flow(
    venv: Path, emulator_url: str, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    for package, name in (("flows", "MY_FLOWS"), ("tasks", "MY_TASKS")):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"{name} = 1\n")
    (project / "run.py").write_text(USER_SCRIPT)
    rows = requests(6)
    source = write_jsonl(project / "requests.jsonl", rows)
    output = project / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        KLUSTER_API_KEY=TEST_API_KEY,
        KLUSTER_BASE_URL=emulator_url,
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    run = subprocess.run(
        [str(venv / "bin" / "python"), "run.py", str(source), str(output)],
        cwd=str(project),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["user_flows"] == [str(project / "flows" / "__init__.py"), 1]
    assert seen["user_tasks"] == [str(project / "tasks" / "__init__.py"), 1]
    for path in seen["ours"]:
        assert Path(path).is_relative_to(venv), path  # from the wheel, not the checkout
    assert seen["top_level"] == []
    assert sorted(r["custom_id"] for r in read_jsonl(output)) == sorted(
        r["custom_id"] for r in rows
    )
    assert TEST_API_KEY not in run.stdout + run.stderr


# --- layering: tasks never reach up into flows ------------------------------------------------


def _tasks_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(ROOT / "tasks")])]
    return ["prefect_kluster.tasks", *(f"prefect_kluster.tasks.{n}" for n in sorted(names))]


WATCH_IMPORTS = textwrap.dedent(
    """\
    import importlib, json, sys

    culprits = {}

    class Watch:
        # Records which tasks module was running when a flows module got imported.
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[:2] == ["prefect_kluster", "flows"] or (
                fullname.split(".")[0] == "flows"
            ):
                frame, chain = sys._getframe(1), []
                while frame is not None:
                    name = frame.f_globals.get("__name__", "")
                    if name.startswith("prefect_kluster.tasks") and name not in chain:
                        chain.append(name)
                    frame = frame.f_back
                culprits.setdefault(fullname, chain[0] if chain else "?")
            return None

    sys.meta_path.insert(0, Watch())
    for module in sys.argv[1:]:
        importlib.import_module(module)
    print(json.dumps(culprits))
    """
)


@pytest.fixture(scope="module")
def flows_imported_by_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One fresh interpreter imports every tasks module; returns flows module -> the tasks
    module that imported it."""
    run = subprocess.run(
        [sys.executable, "-c", WATCH_IMPORTS, *_tasks_modules()],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path_factory.mktemp("fresh")),  # no checkout folders on sys.path
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", _tasks_modules())
def test_importing_a_tasks_module_imports_no_flows(
    module: str, flows_imported_by_tasks: dict[str, str]
) -> None:
    pulled = sorted(f for f, by in flows_imported_by_tasks.items() if by == module)
    assert pulled == [], f"{module} imports {pulled}"


def test_one_fresh_interpreter_importing_every_tasks_module_has_no_flows(
    flows_imported_by_tasks: dict[str, str],
) -> None:
    assert flows_imported_by_tasks == {}


def _source_of(module: str) -> Path:
    name = module.rsplit(".", 1)[-1] if module.count(".") > 1 else "__init__"
    return ROOT / "tasks" / f"{name}.py"


@pytest.mark.parametrize(
    # the compiled module (native/) has no Python source and imports nothing of ours
    "module",
    [m for m in _tasks_modules() if _source_of(m).exists()],
)
def test_no_tasks_module_names_flows_even_in_a_late_import(module: str) -> None:
    """Imports inside functions run only when called: read them from the source."""
    tree = ast.parse(_source_of(module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = ["." * node.level + (node.module or "")]
        else:
            continue
        for target in targets:
            parts = target.lstrip(".").split(".")
            upward = target.startswith("..") and parts[0] == "flows"
            if upward or parts[0] == "flows" or parts[:2] == ["prefect_kluster", "flows"]:
                found.append(f"line {node.lineno}: {target}")
    assert found == [], f"{module}: {found}"


def _pins() -> dict[str, str]:
    """constraints.txt (make lock) as {canonical name: version}."""
    pins: dict[str, str] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt line {number}: {line!r} is not name==version"
        pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_declared_dependency_within_its_range() -> None:
    """What make install-dev installs (pip -c constraints.txt) is inside pyproject.toml's
    ranges, for every dependency and the dev extra (which holds parquet's and s3's): a lock
    that drifted out of them fails here, not as a pip conflict on a fresh clone. The gcs
    and azure extras are neither installed nor tested here, so they are not locked."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    declared += project["optional-dependencies"]["dev"]
    pins = _pins()
    outside = []
    for text in declared:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
            outside.append(f"{text}: constraints.txt has {pinned}")
    assert not outside, "run make lock:\n" + "\n".join(outside)


def test_the_tested_environment_is_the_locked_one() -> None:
    """The tests run on the versions constraints.txt names (make test installs them), so a
    green run vouches for the lock a fresh clone installs."""
    from importlib.metadata import PackageNotFoundError, version

    differ = []
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            differ.append(f"{name}: constraints.txt {pinned}, installed {installed}")
    assert not differ, "reinstall with make install-dev:\n" + "\n".join(differ)
