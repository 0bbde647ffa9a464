"""Defaults and usage counters under concurrent writers (threads with their own connections, on PostgreSQL)."""
import threading

import pytest
from django.db import connection, connections

from llmconfigs.models import LLMConfig
from llmconfigs.services import llm_config_record_usage, llm_config_set_default

needs_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="SQLite serialises every writer on one file lock, so threads cannot race; this needs PostgreSQL.",
)


def _run_threads(count: int, work) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def target(i: int) -> None:
        try:
            barrier.wait(10)
            work(i)
        except BaseException as exc:  # collected and asserted on by the test
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


@needs_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_set_default_calls_leave_exactly_one_default(make_llm_config):
    configs = [make_llm_config() for _ in range(24)]

    errors = _run_threads(len(configs), lambda i: llm_config_set_default(config=configs[i]))

    assert errors == []
    defaults = list(LLMConfig.objects.filter(is_default=True, is_embedding=False))
    assert len(defaults) == 1
    assert defaults[0].pk in {c.pk for c in configs}


@needs_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_usage_recording_loses_no_increment(make_llm_config):
    config = make_llm_config()
    threads, calls = 20, 10

    def work(_i: int) -> None:
        for _ in range(calls):
            llm_config_record_usage(config_id=config.pk, prompt_tokens=3, completion_tokens=2)

    assert _run_threads(threads, work) == []
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert fresh.usage_count == threads * calls
    assert fresh.total_tokens_total == threads * calls * 5


@pytest.mark.django_db
def test_interleaved_usage_recording_from_stale_objects_loses_no_increment(make_llm_config):
    # The sequential analogue for SQLite: two holders of the same stale row both record; F() updates do not overwrite.
    config = make_llm_config()
    stale_a, stale_b = LLMConfig.objects.get(pk=config.pk), LLMConfig.objects.get(pk=config.pk)
    for _ in range(5):
        llm_config_record_usage(config_id=stale_a.pk, prompt_tokens=1)
        llm_config_record_usage(config_id=stale_b.pk, completion_tokens=1)
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert (fresh.usage_count, fresh.prompt_tokens_total, fresh.completion_tokens_total) == (10, 5, 5)


@needs_postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_updates_take_distinct_version_numbers(make_llm_config):
    from llmconfigs.models import LLMConfigVersion
    from llmconfigs.services import llm_config_update

    config = make_llm_config()
    errors = _run_threads(12, lambda i: llm_config_update(config=config, description=f"writer {i}"))

    assert errors == []
    numbers = sorted(LLMConfigVersion.objects.filter(config=config).values_list("number", flat=True))
    assert numbers == list(range(1, 14))  # the create, then one per writer: no number taken twice, none skipped
