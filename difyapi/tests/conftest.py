"""Fixtures for the Service API's tests (builders and the Dify client are in factories.py)."""
import pytest

from difyapi.tests.factories import make_app_with_key


@pytest.fixture
def chat_app(default_llm_config):
    """A chat app that takes files, and its API key."""
    return make_app_with_key(name="chat-app", mode="chat", file_upload={"enabled": True})
