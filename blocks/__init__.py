"""Credentials for kluster.ai: a Prefect block and an environment fallback."""

from prefect_kluster.blocks.credentials import DEFAULT_BASE_URL, KlusterCredentials
from prefect_kluster.blocks.settings import (
    KlusterSettings,
    MissingCredentialsError,
    resolve_credentials,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "KlusterCredentials",
    "KlusterSettings",
    "MissingCredentialsError",
    "resolve_credentials",
]
