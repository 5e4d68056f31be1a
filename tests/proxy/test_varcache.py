"""Session state kept per client and diffed onto server connections."""

from __future__ import annotations

from parser.session_statements import analyse_statement
from proxy.varcache import SessionState, startup_settings

IDLE, IN_TX = 0x49, 0x54


def test_startup_parameters_and_options_become_settings() -> None:
    settings = startup_settings(
        {
            "user": "app",
            "database": "app",
            "application_name": "psql",
            "options": "-c search_path=foo --work_mem=8MB",
        }
    )
    assert set(settings) == {"application_name", "search_path", "work_mem"}
    assert settings["search_path"] == "SELECT pg_catalog.set_config('search_path', 'foo', false)"


def test_a_set_outside_a_transaction_is_kept_once_it_succeeds() -> None:
    state = SessionState({"user": "app"})
    state.note(analyse_statement("SET search_path = x"))
    assert "search_path" not in state.params
    state.on_ready(IDLE, failed=False, tx_outcome=None)
    assert state.params["search_path"] == "SET search_path = x"


def test_a_failed_set_is_not_kept() -> None:
    state = SessionState({"user": "app"})
    state.note(analyse_statement("SET search_path = x"))
    state.on_ready(IDLE, failed=True, tx_outcome=None)
    assert "search_path" not in state.params


def test_a_set_in_a_transaction_waits_for_commit() -> None:
    state = SessionState({"user": "app"})
    state.note(analyse_statement("SET work_mem = '8MB'"))
    state.on_ready(IN_TX, failed=False, tx_outcome=None)
    assert "work_mem" not in state.params
    state.on_ready(IDLE, failed=False, tx_outcome=True)
    assert "work_mem" in state.params


def test_a_set_in_a_transaction_that_rolls_back_is_dropped() -> None:
    state = SessionState({"user": "app"})
    state.note(analyse_statement("SET work_mem = '8MB'"))
    state.on_ready(IN_TX, failed=False, tx_outcome=None)
    state.on_ready(IDLE, failed=False, tx_outcome=False)
    assert "work_mem" not in state.params
    assert not state.tx_pending


def test_rollback_to_savepoint_undoes_later_sets() -> None:
    state = SessionState({"user": "app"})
    for sql in ("SET work_mem = '10MB'", "SAVEPOINT s1", "SET work_mem = '20MB'", "ROLLBACK TO SAVEPOINT s1"):
        state.note(analyse_statement(sql))
    state.on_ready(IN_TX, failed=False, tx_outcome=None)
    state.on_ready(IDLE, failed=False, tx_outcome=True)
    assert state.params["work_mem"] == "SET work_mem = '10MB'"


def test_reset_returns_to_the_startup_value() -> None:
    state = SessionState({"user": "app", "application_name": "psql"})
    state.note(analyse_statement("SET application_name = 'other'"))
    state.note(analyse_statement("SET work_mem = '8MB'"))
    state.on_ready(IDLE, failed=False, tx_outcome=None)
    state.note(analyse_statement("RESET ALL"))
    state.on_ready(IDLE, failed=False, tx_outcome=None)
    assert state.params == state.baseline


def test_replay_is_a_diff_and_nothing_when_equal() -> None:
    state = SessionState({"user": "app", "application_name": "psql"})
    assert state.replay_sql(state.params) is None
    assert state.replay_sql({}) == "SELECT pg_catalog.set_config('application_name', 'psql', false)"
    server_state = {"application_name": state.params["application_name"], "work_mem": "SET work_mem = 1"}
    assert state.replay_sql(server_state) == 'RESET "work_mem"'
