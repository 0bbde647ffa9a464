"""The admin pages of a config, an app and an API key link to the Usage page narrowed to them."""
from __future__ import annotations

import pytest
from django.test import Client

from agentcore.models import AgentApp
from difyapi.auth import api_key_create

pytestmark = pytest.mark.django_db
URL = "/admin/llmconfigs/providercall/"


def test_config_app_and_key_pages_link_to_their_usage(staff_user, make_llm_config):
    client = Client()
    client.force_login(staff_user)
    fast = make_llm_config(name="fast")
    html = client.get(f"/admin/llmconfigs/llmconfig/{fast.pk}/change/").content.decode()
    assert f"{URL}?config={fast.pk}" in html
    app = AgentApp.objects.create(name="Linked", mode=AgentApp.Mode.CHAT)
    assert f"{URL}?app={app.pk}" in client.get(f"/admin/agentcore/agentapp/{app.pk}/change/").content.decode()
    key, _token = api_key_create(app=app)
    assert f"{URL}?key={key.pk}" in client.get(f"/admin/difyapi/apikey/{key.pk}/change/").content.decode()
