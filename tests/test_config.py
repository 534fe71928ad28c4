"""The TOML loader: real files in tmp_path, exact messages naming file and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from limiterd.config import (
    Config,
    ConfigError,
    Limits,
    Settings,
    check_config,
    load_config,
    parse_config,
)
from limiterd.config.loader import MAX_LIMIT

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "limiterd.example.toml"
SCOPE_A = "a" * 64
SCOPE_B = "b" * 64
LIMIT_KEYS = [
    "requests_per_minute",
    "input_tokens_per_minute",
    "output_tokens_per_minute",
    "max_concurrent",
]


def write(tmp_path: Path, text: str, name: str = "limiterd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return list(info.value.problems)


def only_problem(path: Path) -> str:
    found = problems(path)
    assert len(found) == 1, found
    return found[0]


# --- limits -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "shown"),
    [("-5", "-5"), ("0", "0"), ("true", "true"), ("1.5", "1.5"), ('"100"', '"100"'),
     ("[1]", "an array"), ("{a = 1}", "a table"), ("1979-05-27", "a date")],
)
def test_limit_must_be_positive_integer(tmp_path: Path, value: str, shown: str) -> None:
    path = write(tmp_path, f'[models."claude-opus-4-*"]\ninput_tokens_per_minute = {value}\n')
    assert only_problem(path) == (
        f'{path}: models."claude-opus-4-*".input_tokens_per_minute: '
        f"must be a positive integer, got {shown}"
    )


def test_limit_too_large(tmp_path: Path) -> None:
    path = write(tmp_path, f"[user_limits.m]\nmax_concurrent = {MAX_LIMIT + 1}\n")
    assert only_problem(path) == (
        f"{path}: user_limits.m.max_concurrent: must be at most {MAX_LIMIT}, got {MAX_LIMIT + 1}"
    )


def test_model_body_must_be_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[models]\nclaude = 5\n")
    assert only_problem(path) == f"{path}: models.claude: must be a table, got 5"


def test_empty_pattern(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.""]\nrequests_per_minute = 1\n')
    assert only_problem(path) == f'{path}: models."": model pattern must not be empty'


def test_unquoted_dotted_model_id_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "[models.claude-3.5-haiku]\nrequests_per_minute = 1\n")
    msg = only_problem(path)
    assert msg.startswith(f"{path}: models.claude-3.5-haiku: unknown key (a table);")
    assert '[models."claude-3.5-haiku"]' in msg


# --- unknown keys -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("[modles.x]\nrequests_per_minute = 1\n", "modles", 'did you mean "models"?'),
        ("[models.x]\ninput_tokens_per_min = 1\n", "models.x.input_tokens_per_min",
         'did you mean "input_tokens_per_minute"?'),
        ("[daemon]\nmax_lease = 5\n", "daemon.max_lease", 'did you mean "max_lease_ms"?'),
        (f'[[scopes]]\nscope = "{SCOPE_A}"\nalias = "a"\naliass = "b"\n', "scopes[0].aliass",
         'did you mean "alias"?'),
        ("[models.x]\nrpm = 1\n", "models.x.rpm",
         "expected one of: " + ", ".join(LIMIT_KEYS)),
        ('"odd key" = 1\n', '"odd key"',
         "expected one of: daemon, models, user_limits, scopes, ledger"),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, key: str, hint: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path) == f"{path}: {key}: unknown key; {hint}"


# --- [daemon] -----------------------------------------------------------------------------

def test_daemon_values_converted_to_seconds(tmp_path: Path) -> None:
    path = write(tmp_path, """
[daemon]
default_lease_ms = 1500
max_lease_ms = 2000
max_wait_ms = 250
max_waiters_per_queue = 7
settlement_retention_s = 60
max_settlements = 9
idle_sweep_interval_s = 3
""")
    assert load_config(path).settings == Settings(
        default_lease_s=1.5, max_lease_s=2.0, max_wait_s=0.25, max_waiters_per_queue=7,
        settlement_retention_s=60.0, max_settlements=9, idle_sweep_interval_s=3.0,
    )


def test_daemon_partial_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nmax_wait_ms = 1000\n")
    assert load_config(path).settings == Settings(max_wait_s=1.0)


@pytest.mark.parametrize("key", ["default_lease_ms", "max_wait_ms", "max_settlements",
                                 "idle_sweep_interval_s"])
def test_daemon_value_must_be_positive(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f"[daemon]\n{key} = 0\n")
    assert only_problem(path) == f"{path}: daemon.{key}: must be a positive integer, got 0"


def test_refill_allowance_is_ms_and_may_be_zero(tmp_path: Path) -> None:
    assert Settings().refill_allowance_s == 0.1  # the shipped default (issue 15)
    path = write(tmp_path, "[daemon]\nrefill_allowance_ms = 250\n")
    assert load_config(path).settings.refill_allowance_s == 0.25
    path = write(tmp_path, "[daemon]\nrefill_allowance_ms = 0\n")
    assert load_config(path).settings.refill_allowance_s == 0.0  # off
    path = write(tmp_path, "[daemon]\nrefill_allowance_ms = -1\n")
    assert only_problem(path) == (
        f"{path}: daemon.refill_allowance_ms: must be an integer >= 0, got -1")


def test_default_lease_above_max(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\ndefault_lease_ms = 7200000\n")  # max stays 3600000
    assert only_problem(path) == (
        f"{path}: daemon.default_lease_ms: must be <= daemon.max_lease_ms (3600000), got 7200000"
    )


def test_daemon_must_be_table(tmp_path: Path) -> None:
    path = write(tmp_path, 'daemon = "fast"\n')
    assert only_problem(path) == f'{path}: daemon: must be a table, got "fast"'


# --- [[scopes]] ---------------------------------------------------------------------------

def scope_entry(scope: str, alias: str) -> str:
    return f'[[scopes]]\nscope = "{scope}"\nalias = "{alias}"\n'


@pytest.mark.parametrize(
    ("alias", "shown"),
    [("", '""'), ("prod key", '"prod key"'), ("x" * 65, '"' + "x" * 65 + '"'),
     ("prod/key", '"prod/key"'), ("kéy", '"kéy"')],
)
def test_bad_alias(tmp_path: Path, alias: str, shown: str) -> None:
    path = write(tmp_path, scope_entry(SCOPE_A, alias))
    assert only_problem(path) == (
        f"{path}: scopes[0].alias: must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got {shown}"
    )


def test_alias_of_64_chars_is_fine(tmp_path: Path) -> None:
    alias = "A.b_c-9" * 9 + "x"
    path = write(tmp_path, scope_entry(SCOPE_A, alias))
    assert load_config(path).alias_for(SCOPE_A) == alias


def test_missing_scope_and_alias(tmp_path: Path) -> None:
    path = write(tmp_path, "[[scopes]]\n[scopes.models.x]\nrequests_per_minute = 1\n")
    assert problems(path) == [
        f"{path}: scopes[0].scope: missing; the API-key hash this entry applies to",
        f'{path}: scopes[0].alias: missing; a name for logs and metrics, e.g. "prod-key"',
    ]


NOT_A_HASH = ("must be an API key's hash, 64 lowercase hex characters as `limiterd scope` and "
              "the client's scope_for_api_key print it; got ")


@pytest.mark.parametrize(
    ("value", "what"),
    [('""', 'must be a non-empty string, got ""'),
     ("42", "must be a non-empty string, got 42"),
     ('"' + "é" * 129 + '"', NOT_A_HASH + "129 characters with some not hex"),
     ('"team-a-hash"', NOT_A_HASH + "11 characters with some not hex"),
     ('"' + "A" * 64 + '"', NOT_A_HASH + "64 characters"),  # upper case never matches
     ('"' + "a" * 63 + '"', NOT_A_HASH + "63 characters")],
)
def test_bad_scope(tmp_path: Path, value: str, what: str) -> None:
    path = write(tmp_path, f'[[scopes]]\nscope = {value}\nalias = "a"\n')
    assert only_problem(path) == f"{path}: scopes[0].scope: {what}"


def test_a_raw_api_key_as_scope_is_refused_and_never_echoed(tmp_path: Path) -> None:
    key = "sk-ant-api03-" + "Zx9" * 30
    path = write(tmp_path, f'[[scopes]]\nscope = "{key}"\nalias = "prod"\n')
    problem = only_problem(path)
    assert problem.startswith(f"{path}: scopes[0].scope: is a raw API key")
    assert "limiterd scope" in problem and key[:16] not in problem


def test_a_file_with_only_scopes_keeps_the_built_in_model_rules(tmp_path: Path) -> None:
    path = write(tmp_path, scope_entry(SCOPE_A, "prod"))
    cfg = load_config(path)
    builtin = load_config(None)
    assert cfg.models == builtin.models and cfg.models
    assert cfg.limits_for(SCOPE_A, "claude-opus-4-5") == builtin.limits_for(
        SCOPE_A, "claude-opus-4-5")
    assert "(built in: this file has no [models])" in check_config(path)
    # An explicit [models] replaces them all; an empty one means none.
    assert load_config(write(tmp_path, "[models]\n")).models == ()
    own = write(tmp_path, '[models."m"]\nrequests_per_minute = 1\n')
    assert [r.pattern for r in load_config(own).models] == ["m"]
    assert "built in" not in check_config(own)


def test_scope_hash_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, scope_entry("0123456789abcdef" * 4, "a"))
    assert load_config(path).alias_for("0123456789abcdef" * 4) == "a"


def test_duplicate_scope(tmp_path: Path) -> None:
    path = write(tmp_path, scope_entry(SCOPE_A, "one") + scope_entry(SCOPE_A, "two"))
    assert only_problem(path) == (
        f'{path}: scopes[1].scope: duplicate of scopes[0].scope "{SCOPE_A}"'
    )


def test_duplicate_alias(tmp_path: Path) -> None:
    path = write(tmp_path, scope_entry(SCOPE_A, "one") + scope_entry(SCOPE_B, "one"))
    assert only_problem(path) == f'{path}: scopes[1].alias: duplicate of scopes[0].alias "one"'


def test_scopes_must_be_array_of_tables(tmp_path: Path) -> None:
    path = write(tmp_path, f'[scopes]\nscope = "{SCOPE_A}"\n')
    assert only_problem(path) == (
        f"{path}: scopes: must be an array of tables ([[scopes]]), got a table"
    )


def test_scope_override_limit_checked(tmp_path: Path) -> None:
    path = write(tmp_path, scope_entry(SCOPE_A, "a")
                 + '[scopes.user_limits."claude-*"]\nrequests_per_minute = -1\n')
    assert only_problem(path) == (
        f'{path}: scopes[0].user_limits."claude-*".requests_per_minute: '
        "must be a positive integer, got -1"
    )


# --- whole-file problems ------------------------------------------------------------------

def test_all_problems_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[daemon]
max_wait_ms = -1
[models.a]
requests_per_minute = 0
output_tokens = 5
{scope_entry(SCOPE_A, "bad alias")}
""")
    assert problems(path) == [
        f"{path}: daemon.max_wait_ms: must be a positive integer, got -1",
        f"{path}: models.a.requests_per_minute: must be a positive integer, got 0",
        f'{path}: models.a.output_tokens: unknown key; did you mean "output_tokens_per_minute"?',
        f'{path}: scopes[0].alias: must be 1 to 64 characters of A-Z a-z 0-9 . _ -, '
        'got "bad alias"',
    ]


def test_config_error_is_value_error() -> None:
    with pytest.raises(ValueError, match=r"^x\.toml: models: must be a table, got 1$"):
        parse_config("models = 1\n", "x.toml")


def test_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nmax_wait_ms 5\n")
    assert only_problem(path) == (
        f"{path}: line 2, column 13: invalid TOML: "
        "Expected '=' after a key in a key/value pair"
    )


def test_syntax_error_at_end(tmp_path: Path) -> None:
    path = write(tmp_path, "[models.a]\nrequests_per_minute = [1,")
    assert only_problem(path).startswith(f"{path}: end of document: invalid TOML: ")


def test_toml_duplicate_table_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[models."a"]\nrequests_per_minute = 1\n[models."a"]\n')
    assert only_problem(path) == (
        f"{path}: line 3, column 12: invalid TOML: Cannot declare ('models', 'a') twice"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert only_problem(path) == f"{path}: config file not found"


def test_directory(tmp_path: Path) -> None:
    assert only_problem(tmp_path) == f"{tmp_path}: is a directory, not a config file"


def test_path_through_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "") / "child.toml"
    assert only_problem(path) == f"{path}: cannot read config file: Not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.chmod(0)
    assert only_problem(path) == f"{path}: config file not readable: permission denied"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    assert only_problem(path) == f"{path}: not UTF-8 text (bad byte at offset 5)"


def test_empty_models_table_knows_no_model(tmp_path: Path) -> None:
    path = write(tmp_path, "[models]\n")
    cfg = load_config(path)
    assert cfg == Config(source=str(path))
    assert cfg.limits_for(SCOPE_A, "claude-opus-4-5") is None
    assert "no model rules: every model is unknown" in check_config(path)


# --- lookups ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("model", "rpm", "itpm", "otpm"),
    [("claude-opus-4-1-20250805", 50, 30_000, 8_000),
     ("claude-opus-4-5", 50, 30_000, 8_000),
     ("claude-sonnet-4-5", 50, 30_000, 8_000),
     ("claude-sonnet-4-20250514", 50, 30_000, 8_000),
     ("claude-haiku-4-5", 50, 50_000, 10_000),
     ("claude-3-5-haiku-latest", 50, 50_000, 10_000)],
)
def test_shipped_defaults(model: str, rpm: int, itpm: int, otpm: int) -> None:
    cfg = load_config(None)
    assert cfg.limits_for(SCOPE_A, model) == Limits(rpm, itpm, otpm)
    assert cfg.user_limits_for(SCOPE_A, model) is None


def test_shipped_defaults_settings_match_model_defaults() -> None:
    cfg = load_config(None)
    assert cfg.settings == Settings()
    assert cfg.limits_for(SCOPE_A, "gpt-4o") is None


def test_scope_override_merges_fieldwise(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[models."claude-sonnet-4*"]
requests_per_minute = 50
input_tokens_per_minute = 30000
output_tokens_per_minute = 8000
{scope_entry(SCOPE_A, "prod")}
[scopes.models."claude-sonnet-4*"]
input_tokens_per_minute = 80000
max_concurrent = 3
""")
    cfg = load_config(path)
    assert cfg.limits_for(SCOPE_A, "claude-sonnet-4-5") == Limits(50, 80_000, 8_000, 3)
    assert cfg.limits_for(SCOPE_B, "claude-sonnet-4-5") == Limits(50, 30_000, 8_000)
    assert cfg.alias_for(SCOPE_A) == "prod"
    assert cfg.alias_for(SCOPE_B) is None


def test_scope_override_for_model_without_default(tmp_path: Path) -> None:
    path = write(tmp_path, scope_entry(SCOPE_A, "a") + "[scopes.models.m]\nmax_concurrent = 2\n")
    cfg = load_config(path)
    assert cfg.limits_for(SCOPE_A, "m") == Limits(max_concurrent=2)
    assert cfg.limits_for(SCOPE_B, "m") is None


def test_exact_beats_glob_then_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, """
[models."claude-*"]
requests_per_minute = 1
[models."claude-opus-*"]
requests_per_minute = 2
[models."claude-opus-4-5"]
requests_per_minute = 3
""")
    cfg = load_config(path)
    assert cfg.limits_for(SCOPE_A, "claude-opus-4-5") == Limits(requests_per_minute=3)
    assert cfg.limits_for(SCOPE_A, "claude-opus-4-1") == Limits(requests_per_minute=1)
    assert cfg.limits_for(SCOPE_A, "gemini") is None


def test_user_limits_lookup(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[models."claude-*"]
requests_per_minute = 50
[user_limits."claude-*"]
requests_per_minute = 10
output_tokens_per_minute = 900
{scope_entry(SCOPE_A, "a")}
[scopes.user_limits."claude-haiku-*"]
requests_per_minute = 5
""")
    cfg = load_config(path)
    assert cfg.user_limits_for(SCOPE_A, "claude-haiku-4-5") == Limits(5, None, 900)
    assert cfg.user_limits_for(SCOPE_A, "claude-opus-4-5") == Limits(10, None, 900)
    assert cfg.user_limits_for(SCOPE_B, "claude-haiku-4-5") == Limits(10, None, 900)
    assert cfg.user_limits_for(SCOPE_A, "gpt-4o") is None


def test_example_file_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.models and cfg.user_models and len(cfg.scopes) == 2
    summary = check_config(EXAMPLE)
    assert summary.startswith(f"{EXAMPLE}: OK\n")
    assert "2 scopes: prod-key, batch-jobs" in summary


def test_check_config_raises_like_load(tmp_path: Path) -> None:
    path = write(tmp_path, "[models.a]\nrpm = 1\n")
    with pytest.raises(ConfigError, match=r"models\.a\.rpm: unknown key"):
        check_config(path)


# --- properties ---------------------------------------------------------------------------

@given(key=st.sampled_from(LIMIT_KEYS), n=st.integers(1, MAX_LIMIT))
def test_any_valid_limit_round_trips(key: str, n: int) -> None:
    cfg = parse_config(f'[models."m*"]\n{key} = {n}\n', "p.toml")
    limits = cfg.limits_for("s", "m-1")
    assert limits is not None and getattr(limits, key) == n


@given(key=st.sampled_from(LIMIT_KEYS),
       n=st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_LIMIT + 1)))
def test_any_out_of_range_limit_rejected(key: str, n: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[user_limits.m]\n{key} = {n}\n", "p.toml")
    assert info.value.problems == (
        f"p.toml: user_limits.m.{key}: "
        + ("must be a positive integer" if n <= 0 else f"must be at most {MAX_LIMIT}")
        + f", got {n}",
    )


@given(ms=st.integers(1, 3_600_000))
def test_any_lease_ms_converts_to_seconds(ms: int) -> None:
    cfg = parse_config(f"[daemon]\ndefault_lease_ms = {ms}\n", "p.toml")
    assert cfg.settings.default_lease_s * 1000 == pytest.approx(ms)


@given(alias=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
       scope=st.from_regex(r"[0-9a-f]{64}", fullmatch=True))
def test_any_valid_scope_and_alias_accepted(alias: str, scope: str) -> None:
    toml = f"[[scopes]]\nscope = {_toml_str(scope)}\nalias = {_toml_str(alias)}\n"
    assert parse_config(toml, "p.toml").alias_for(scope) == alias


def _toml_str(s: str) -> str:
    """A TOML basic string for any text (TOML has no escape for some JSON ones, so \\u)."""
    return '"' + "".join(c if c.isalnum() or c in " ._-" else f"\\U{ord(c):08x}"
                         for c in s) + '"'
