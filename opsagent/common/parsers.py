"""The request body parsers of the REST API (/api)."""
from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from opsagent.common.client_input import ClientInputError, json_loads


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser with the bounds of every client's JSON (opsagent.common.client_input): 400 `{"detail"}`
    rather than a 500 for deep nesting, NUL characters or lone surrogates anywhere in the body."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            return json_loads(stream.read().decode(encoding))
        except ClientInputError as exc:
            raise ParseError(f"JSON parse error - {exc.message}") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
