"""Who may call which REST action: Django's permissions (model and custom ones), never the staff flag."""
from __future__ import annotations

from rest_framework.permissions import BasePermission

# OPTIONS: DRF's metadata only describes the endpoint (and checks the real action's permissions itself).
_ALWAYS_NAMED = {"metadata": ()}


class ActionPermissions(BasePermission):
    """Every view states, in `action_permissions`, the Django permissions each of its actions needs (viewset actions
    by name, plain views by HTTP method in lower case). An empty tuple lets any authenticated user in: what they then
    see or change is narrowed further by the selectors and services (their own sessions, their own approvals).

    An action the view does not name is refused, so a new endpoint stays closed until someone decides who may use
    it. Superusers hold every permission (Django's `has_perms`); `is_staff` plays no part."""

    message = "You do not have the permission this action needs."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        required = self.required(view, request)
        return required is not None and user.has_perms(required)

    @staticmethod
    def required(view, request) -> tuple[str, ...] | None:
        """The permissions `request` needs on `view`, or None when the view does not name the action."""
        action = getattr(view, "action", None)
        if action is None and getattr(view, "action_map", None) is not None:
            # A viewset answers a method it does not route with 405; needing a permission for that would hide it.
            return ()
        name = action or request.method.lower()
        return {**_ALWAYS_NAMED, **view.action_permissions}.get(name)
