"""What SET, RESET, DISCARD and friends do to session state, read the way PostgreSQL reads them."""

from __future__ import annotations

import pytest

from parser.session_statements import Effect, analyse_query, analyse_statement, quote_literal, set_statement


@pytest.mark.parametrize(
    ("sql", "key"),
    [
        ("SET search_path = foo, public", "search_path"),
        ("set Search_Path TO 'x'", "search_path"),
        ("SET SESSION statement_timeout = 5", "statement_timeout"),
        ("SET TIME ZONE 'UTC'", "timezone"),
        ("SET time  zone local", "timezone"),
        ("SET SCHEMA 'app'", "search_path"),
        ("SET NAMES 'UTF8'", "client_encoding"),
        ("SET myapp.user_id = '42'", "myapp.user_id"),
        ('SET "MyApp"."Key" = 1', "MyApp.Key"),
    ],
)
def test_set_is_tracked_by_parameter(sql: str, key: str) -> None:
    effect = analyse_statement(sql)
    assert effect.effect is Effect.SET
    assert effect.key == key
    assert effect.statement == sql


def test_set_local_and_transaction_scoped_sets_are_not_kept() -> None:
    assert analyse_statement("SET LOCAL search_path = x").effect is Effect.NONE
    assert analyse_statement("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").effect is Effect.NONE
    assert analyse_statement("SET CONSTRAINTS ALL DEFERRED").effect is Effect.NONE


def test_reset_and_discard() -> None:
    assert analyse_statement("RESET ALL").effect is Effect.RESET_ALL
    reset = analyse_statement("reset search_path")
    assert (reset.effect, reset.key) == (Effect.RESET, "search_path")
    assert analyse_statement("RESET TIME ZONE").key == "timezone"
    assert analyse_statement("DISCARD ALL").effect is Effect.DISCARD_ALL


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SET ROLE admin", "SET ROLE"),
        ("SET SESSION AUTHORIZATION bob", "SET SESSION"),
        ("LISTEN jobs", "LISTEN"),
        ("PREPARE q AS SELECT 1", "SQL PREPARE"),
        ("CREATE TEMP TABLE t (a int)", "temporary table"),
        ("create global temporary table t (a int)", "temporary table"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursor WITH HOLD"),
        ("SELECT pg_advisory_lock(1)", "session advisory lock"),
        ("SELECT set_config('a.b', current_user, false)", "set_config with computed arguments"),
    ],
)
def test_state_that_cannot_be_replayed_pins(sql: str, reason: str) -> None:
    effect = analyse_statement(sql)
    assert effect.effect is Effect.PIN
    assert effect.key == reason


def test_transaction_scoped_functions_do_not_pin() -> None:
    assert analyse_statement("SELECT pg_advisory_xact_lock(1)").effect is Effect.NONE
    assert analyse_statement("SELECT set_config('a.b', 'x', true)").effect is Effect.NONE
    assert analyse_statement("DECLARE c CURSOR FOR SELECT 1").effect is Effect.NONE


def test_set_config_with_literals_becomes_a_set() -> None:
    effect = analyse_statement("select set_config('app.tenant', 'it''s', false)")
    assert (effect.effect, effect.key) == (Effect.SET, "app.tenant")
    assert effect.statement == "SELECT pg_catalog.set_config('app.tenant', 'it''s', false)"


def test_every_set_config_of_a_statement_counts() -> None:
    effects = analyse_query("SELECT set_config('work_mem', '13MB', false), set_config('a.b', 'x', true)")
    assert [(e.effect, e.key) for e in effects] == [(Effect.SET, "work_mem")]


def test_savepoints_are_markers() -> None:
    effects = analyse_query("SAVEPOINT s1; RELEASE SAVEPOINT s1; ROLLBACK TO SAVEPOINT S2")
    assert [(e.effect, e.key) for e in effects] == [
        (Effect.SAVEPOINT, "s1"),
        (Effect.RELEASE, "s1"),
        (Effect.ROLLBACK_TO, "s2"),
    ]


def test_deallocate() -> None:
    assert analyse_statement("DEALLOCATE ALL").key is None
    assert analyse_statement("DEALLOCATE PREPARE _pg3_1").key == "_pg3_1"
    assert analyse_statement('deallocate "Q1"').key == "Q1"


def test_multi_statement_query_reports_every_effect_in_order() -> None:
    effects = analyse_query("SET a.b = 1; SELECT 1; RESET a.b; LISTEN x")
    assert [e.effect for e in effects] == [Effect.SET, Effect.RESET, Effect.PIN]


def test_literals_survive_backslashes_whatever_standard_conforming_strings_says() -> None:
    assert quote_literal("a\\b") == "E'a\\\\b'"
    assert set_statement("search_path", "a,b") == "SELECT pg_catalog.set_config('search_path', 'a,b', false)"
