"""Defaults shared by the CLI, the deploy files' checks and the docs."""

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DB = "var/limiterd.sqlite3"  # relative to the working directory; $LIMITERD_DB overrides
DEFAULT_GRACE_S = 10.0  # SIGTERM: how long in-flight calls may take to finish
ENV_PREFIX = "LIMITERD"  # every `serve` option can come from LIMITERD_<OPTION>
ADMIN_TOKEN_KEY = "x-limiterd-admin-token"  # the metadata key Admin calls carry the token in
