"""The chat page (/chat/): a Django template with static JS and CSS. The page talks to the REST API (sessions,
messages, approvals) and streams turns over the agent's WebSocket; this view only hands it its starting data."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET

from agentcore.selectors import chat_page_data, chat_page_may_admin


@require_GET
@login_required
@ensure_csrf_cookie
def chat_page(request):
    return render(request, "chat/index.html", {"chat_data": chat_page_data(user=request.user),
                                               "may_admin": chat_page_may_admin(user=request.user)})


@require_GET
def home(request):
    """`/`: the chat page for a signed-in user, the login page (coming back to the chat) for anyone else."""
    if request.user.is_authenticated:
        return redirect("chat")
    return redirect(f"{reverse('login')}?{urlencode({'next': reverse('chat')})}")
