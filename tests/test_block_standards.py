"""Every block of prefect_kluster meets Prefect's own BlockStandardTestSuite, registers with
``prefect block register -m prefect_kluster``, and is found through the package's
``prefect.collections`` entry point without being imported first."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

import pytest
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.utilities.dispatch import get_registry_for_type
from prefect.utilities.importtools import to_qualified_name

import prefect_kluster

EXPECTED = {
    "kluster-ai-credentials": "kluster.ai Credentials",
    "kluster-ai-batch-job": "kluster.ai Batch Job",
}
PREFECT = str(Path(sys.executable).with_name("prefect"))


def find_module_blocks() -> list[type[Block]]:
    """The block classes defined anywhere in prefect_kluster. Every public name is loaded
    first: names load on first use, and a module collected earlier may have imported the
    package before Prefect (when it defines no block at import)."""
    for name in prefect_kluster.__all__:
        getattr(prefect_kluster, name)
    registry = get_registry_for_type(Block) or {}
    return sorted(
        (b for b in registry.values() if to_qualified_name(b).startswith("prefect_kluster.")),
        key=lambda b: b.__name__,
    )


def test_the_suite_covers_every_block() -> None:
    found = {b.get_block_type_slug(): b.get_block_type_name() for b in find_module_blocks()}
    assert found == EXPECTED
    assert {b.__name__ for b in find_module_blocks()} <= set(prefect_kluster.__all__)


def _reachable(url: str, timeout: float = 2.0) -> bool:
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("block", find_module_blocks(), ids=lambda b: b.__name__)
class TestAllBlocksAdhereToStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block: type[Block]) -> type[Block]:
        return block

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        """The suite downloads the logo: checked only where the network allows."""
        assert block._logo_url and str(block._logo_url).startswith("https://")
        if not _reachable(str(block._logo_url)):
            pytest.skip("offline: the logo cannot be downloaded")
        pytest.importorskip("PIL", reason="Pillow is needed to read the logo")
        super().test_has_a_valid_image(block)


def test_block_register_lists_both_block_types() -> None:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    result = subprocess.run(
        [PREFECT, "block", "register", "-m", "prefect_kluster"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Successfully registered 2 blocks" in result.stdout, result.stdout
    for name in EXPECTED.values():
        assert name in result.stdout
    with get_client(sync_client=True) as client:
        job_type = client.read_block_type_by_slug("kluster-ai-batch-job")
        job_schema = next(s for s in client.read_block_schemas() if s.block_type_id == job_type.id)
        credentials_type = client.read_block_type_by_slug("kluster-ai-credentials")
    assert job_type.name == EXPECTED["kluster-ai-batch-job"]
    assert credentials_type.name == EXPECTED["kluster-ai-credentials"]
    assert job_schema.fields["properties"]["kluster_credentials"]["$ref"].endswith(
        "KlusterCredentials"
    )
    assert {"request_file", "completion_window", "timeout_seconds"} <= set(
        job_schema.fields["properties"]
    )


def test_entry_point_lists_the_package_and_its_blocks() -> None:
    found = {ep.name: ep for ep in entry_points(group="prefect.collections")}
    assert found["prefect_kluster"].value == "prefect_kluster"
    module = found["prefect_kluster"].load()
    assert {module.KlusterCredentials, module.KlusterBatchJob} == set(find_module_blocks())


def test_prefect_finds_the_block_types_by_slug_without_importing_the_package() -> None:
    """What the entry point is for: a worker loading a saved block by its type slug."""
    code = (
        "import sys\n"
        "from prefect.blocks.core import Block\n"
        "assert 'prefect_kluster' not in sys.modules\n"
        "for slug in sys.argv[1:]:\n"
        "    cls = Block.get_block_class_from_key(slug)\n"
        "    print(cls.__module__, cls.__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *EXPECTED],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == [
        "prefect_kluster.blocks.credentials KlusterCredentials",
        "prefect_kluster.flows.jobs KlusterBatchJob",
    ]
