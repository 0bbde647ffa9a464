"""The update_plan tool: the agent keeps a conversation's plan (ordered steps with a status) through it."""
from __future__ import annotations

from asgiref.sync import sync_to_async
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field

from agentcore.services import task_replace
from agentcore.tools.builtin import json_text, per_run_tool

PLAN_MAX_TASKS = 50


class PlanItem(BaseModel):
    title: str = Field(max_length=500)
    status: str = Field(default="pending", description="pending, in_progress or done")


def update_plan_tool(*, session_id: str) -> BaseTool:
    async def update_plan(tasks: list[PlanItem]) -> str:
        """Replace the plan for this conversation with `tasks` (ordered steps, each with a title and a status:
        pending, in_progress or done). Send the whole plan every time."""
        if len(tasks) > PLAN_MAX_TASKS:
            return f"Error: a plan has at most {PLAN_MAX_TASKS} steps."
        items = [item if isinstance(item, PlanItem) else PlanItem(**item) for item in tasks]
        try:
            saved = await sync_to_async(task_replace)(session_id=session_id,
                                                      tasks=[item.model_dump() for item in items])
        except ValueError as exc:
            return f"Error: {exc}"
        return json_text({"ok": True, "tasks": saved})

    return per_run_tool(update_plan)
