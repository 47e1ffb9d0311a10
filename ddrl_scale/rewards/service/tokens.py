"""The reward service's shared-secret token: from an argument, a file or an environment variable."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ddrl_scale.config import ConfigError
from ddrl_scale.rewards.service.wire import DEFAULT_TOKEN_ENV, MIN_TOKEN_LENGTH

logger = logging.getLogger(__name__)


def resolve_token(
    token: str | None = None,
    token_file: str | os.PathLike | None = None,
    token_env: str | None = DEFAULT_TOKEN_ENV,
    where: str = "reward service",
) -> str:
    """The shared secret: ``token``, else the contents of ``token_file``, else ``$token_env``.

    Raises:
        ConfigError: both ``token`` and ``token_file`` given, an unreadable file, no token at
            all, or a token shorter than ``MIN_TOKEN_LENGTH`` / not printable ASCII.
    """
    if token is not None and token_file is not None:
        raise ConfigError(f"{where}: give the token or the token file, not both")
    if token is not None:
        source = "the token argument"
    elif token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
            mode = path.stat().st_mode
        except OSError as error:
            raise ConfigError(f"{where}: cannot read the token file {path}: {error}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("token file %s is readable by other users; chmod 600 it", path)
        source = f"token file {path}"
    elif token_env and os.environ.get(token_env):
        token, source = os.environ[token_env], f"environment variable {token_env}"
    else:
        env_hint = f", or set the environment variable {token_env}" if token_env else ""
        raise ConfigError(f"{where}: no shared-secret token; give a token file{env_hint}")
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH or not (token.isascii() and token.isprintable()) or " " in token:
        raise ConfigError(
            f"{where}: the token from {source} must be at least {MIN_TOKEN_LENGTH} printable ASCII "
            f"characters without spaces (for example: python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))')"
        )
    return token

