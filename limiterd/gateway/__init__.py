"""`limiterd gateway`: a local Anthropic-compatible HTTP gateway in front of the provider.

Apps point `ANTHROPIC_BASE_URL` at it and every `POST /v1/messages` is reserved with the
daemon before it is forwarded and reported after it ends; everything else is proxied as is.
The gateway is a client of the daemon like any app (it uses `limiterd_client`).

Modules: `config` (typed settings, TOML), `wire` (provider-format errors, header rules, the
SSE usage tap), `messages` (the limited route), `proxy` (pass-through), `metrics`,
`app` (wiring and the process lifecycle), `command` (the click command).
"""
