"""The admin key: where it comes from, and the one process that holds it.

Sources, first given wins: ``--alchemist-admin-key KEY`` > ``--alchemist-admin-key-file PATH``
(the file's content, stripped) > the environment variable ``SGLANG_ALCHEMIST_ADMIN_KEY``. The
file and the variable keep the key off the command line (``ps`` shows argv to every user).

Only the HTTP process checks the key, and SGLang's HTTP server runs in the launcher's own
process. So the launcher resolves the key and hands it over through :func:`hold`; it is never
part of the config JSON exported to every SGLang process (``SGLANG_ALCHEMIST_CONFIG``), and the
launcher removes the variable from its environment so that the spawned scheduler and
detokenizer do not inherit it. The scheduler never needs the key.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from sglang_alchemist.config import AlchemistConfig, ConfigError

ADMIN_KEY_ENV_VAR = "SGLANG_ALCHEMIST_ADMIN_KEY"
FILE_FLAG = "--alchemist-admin-key-file"

_held: dict[str, str | None] = {}  # "key" -> the resolved key, set once in the HTTP process


def resolve_admin_key(config: AlchemistConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin key from flag, file or environment (in that order); None when none is set.

    Raises ConfigError (one line naming the flag or variable) for a key file that is missing,
    unreadable or empty, and for an environment variable that is set but empty.
    """
    environ = os.environ if environ is None else environ
    if config.admin_key:
        return config.admin_key
    if config.admin_key_file:
        path = Path(config.admin_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ConfigError(f"{FILE_FLAG}: {path} does not exist; allowed: a readable file "
                              f"holding the key") from None
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ConfigError(f"{FILE_FLAG}: cannot read {path} ({reason}); allowed: a readable "
                              f"UTF-8 file holding the key") from None
        if not key:
            raise ConfigError(f"{FILE_FLAG}: {path} is empty; allowed: a file holding a non-empty key")
        return key
    if ADMIN_KEY_ENV_VAR in environ:
        key = environ[ADMIN_KEY_ENV_VAR].strip()
        if not key:
            raise ConfigError(f"{ADMIN_KEY_ENV_VAR}: set but empty; allowed: a non-empty key, or "
                              f"unset it to leave the admin endpoints open")
        return key
    return None


def hold(key: str | None) -> None:
    """Keep the resolved key for this (the HTTP) process."""
    _held["key"] = key


def held_admin_key(config: AlchemistConfig) -> str | None:
    """The key held by the launcher; else (SGLang started another way) resolved here."""
    if "key" in _held:
        return _held["key"]
    key = resolve_admin_key(config)
    hold(key)
    return key


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to any interface


def open_admin_warning(host: str | None, key: str | None) -> str | None:
    """The start-up warning for admin routes open to the network, or None."""
    if key or is_loopback_host(host):
        return None
    return (f"sglang_alchemist: no admin key is set and --host {host} is not a loopback address: the "
            f"/v1/alchemist/* admin endpoints (rollback, pause, recording, ...) are open to the network; "
            f"set --alchemist-admin-key-file, {ADMIN_KEY_ENV_VAR} or --alchemist-admin-key")
