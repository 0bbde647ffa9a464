"""The run service: prepares a turn (rows, model, parameters), runs the agent graph and yields neutral events.

This is the contract between the engine and its interfaces (REST, WebSocket, the Dify adapter): they call what this
package exports, plus models and selectors. One module per concern:

- `types`: what callers hand in (TurnRequest and its parts) and get back (Turn);
- `prepare`: validation, the app's capacity and the transactions that write a turn's rows (a new query, or an
  approval's decision resuming a paused run);
- `lifecycle`: the run itself (producer task, heartbeat, stop requests through the channel layer);
- `output`: the graph's output as thought rows and events, and the saved end of a turn with its usage and cost;
- `chat_models`: the chat models runs share, and their HTTP clients per event loop;
- `direct`: a turn answered without a model call (a stock answer), remembered in the conversation's checkpoint.

Async/sync pairs follow Django's rule: the async one has an `a` prefix (`turn_prepare` from sync code,
`aturn_prepare` from the event loop).
"""
from agentcore.checkpoint import SaverOpening
from agentcore.runs.chat_models import provider_client
from agentcore.runs.direct import turn_remember_answer
from agentcore.runs.lifecycle import run_stop, turn_prepare_and_run, turn_run
from agentcore.runs.output import UNAVAILABLE
from agentcore.runs.prepare import aturn_prepare, prepared_or_abandoned, turn_abandon, turn_admit, turn_prepare
from agentcore.runs.types import ApprovalDecision, Attachment, Turn, TurnOverrides, TurnRequest

__all__ = [
    "UNAVAILABLE", "ApprovalDecision", "Attachment", "SaverOpening", "Turn", "TurnOverrides", "TurnRequest",
    "aturn_prepare", "prepared_or_abandoned", "provider_client", "run_stop", "turn_abandon", "turn_admit",
    "turn_prepare", "turn_prepare_and_run", "turn_remember_answer", "turn_run",
]
