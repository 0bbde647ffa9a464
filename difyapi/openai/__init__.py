"""The OpenAI-compatible surface beside the Dify one: POST /v1/chat/completions (a pool, or the app's agent, as the
model) on the same app keys, allow-lists, limits and pools. See docs/api-openai.md."""
