# The two commands: `make run` (set up and serve on 127.0.0.1:8000; `make run PORT=8001 HOST=0.0.0.0` elsewhere) and
# `make test` (the whole suite). `make demo` serves with a fake model, so the first chat answers without a provider key.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_UPSTREAM_PORT ?= 9100
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MANAGE := DJANGO_READ_DOT_ENV_FILE=1 $(PY) manage.py

.PHONY: run demo check-port test install install-dev lint bench mutate

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# pip's progress bars stay on: the first install downloads for a few minutes.
$(VENV)/.installed: requirements.txt | $(PY)
	@echo "Installing the dependencies into $(VENV) (the first time takes a few minutes)..."
	$(PIP) install --progress-bar on -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	@echo "Installing the development dependencies..."
	$(PIP) install --progress-bar on -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# A local, git-ignored .env with generated secrets, written once so stored keys stay decryptable across restarts.
.env: | $(PY)
	@$(PY) -c "import secrets; print('\n'.join(['# Written by make run. Keep FIELD_ENCRYPTION_KEY: stored API keys need it.', \
	'DJANGO_SECRET_KEY=' + secrets.token_urlsafe(50), 'FIELD_ENCRYPTION_KEY=' + secrets.token_urlsafe(48), \
	'DJANGO_ALLOWED_HOSTS=127.0.0.1,localhost', 'DJANGO_SUPERUSER_USERNAME=admin', \
	'DJANGO_SUPERUSER_EMAIL=admin@localhost', 'DJANGO_SUPERUSER_PASSWORD=' + secrets.token_urlsafe(12)]))" > .env
	@echo "Wrote .env with generated secrets."

# The address to print: a wildcard HOST is reached on loopback from this machine.
URL_HOST := $(if $(filter 0.0.0.0 ::,$(HOST)),127.0.0.1,$(HOST))
# Served beyond loopback: the names clients use must be allowed hosts.
HOST_HINT := $(if $(filter 127.0.0.1 localhost ::1,$(HOST)),,echo "Clients on other machines: add the name or address \
they use to DJANGO_ALLOWED_HOSTS in .env (Django refuses other Host headers).")

# Before any setup: a port already taken would otherwise fail only after minutes of installing.
check-port:
	@$(PYTHON) -c "import socket, sys; s = socket.socket(socket.AF_INET6 if ':' in '$(HOST)' else socket.AF_INET); \
	s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('$(HOST)', $(PORT)))" 2>/dev/null || { \
	echo "Port $(PORT) on $(HOST) is busy (or not an address of this machine): stop what uses it, or pick another," \
	"e.g. make $(firstword $(MAKECMDGOALS) run) PORT=$$(($(PORT) + 1))"; exit 1; }

run: check-port install .env
	$(MANAGE) migrate --noinput
	$(MANAGE) collectstatic --noinput -v0
	$(MANAGE) seed --templates --url http://$(URL_HOST):$(PORT)
	@echo "Serving OpsAgent on http://$(URL_HOST):$(PORT) (chat: /chat/, admin: /admin/, Dify API: /v1). Ctrl+C stops."
	@$(HOST_HINT)
	DJANGO_READ_DOT_ENV_FILE=1 $(VENV)/bin/daphne -b $(HOST) -p $(PORT) opsagent.asgi:application

# `make run` with the project's fake OpenAI-compatible model (tests/fakes/upstream.py) on DEMO_UPSTREAM_PORT and a demo
# config for it (the default model unless one is configured): canned answers, streamed, no key, no internet.
demo: check-port install-dev .env
	$(MANAGE) migrate --noinput
	$(MANAGE) collectstatic --noinput -v0
	$(MANAGE) seed --templates --demo-upstream http://127.0.0.1:$(DEMO_UPSTREAM_PORT)/v1 --url http://$(URL_HOST):$(PORT)
	@echo "Serving the OpsAgent demo on http://$(URL_HOST):$(PORT) (fake model on port $(DEMO_UPSTREAM_PORT)). Ctrl+C stops both."
	@$(HOST_HINT)
	@$(PY) -m tests.fakes.upstream --port $(DEMO_UPSTREAM_PORT) --delay 0.05 \
	    --text "Hello from the OpsAgent demo model. This answer is canned and streamed word by word: add a real provider in the admin (LLM configs) to get real answers." & \
	upstream=$$!; trap 'kill $$upstream 2>/dev/null' EXIT INT TERM; \
	DJANGO_READ_DOT_ENV_FILE=1 $(VENV)/bin/daphne -b $(HOST) -p $(PORT) opsagent.asgi:application

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: install-dev
	$(PY) bench/llmconfigs_list.py

# Mutation testing of the security-critical modules (configured in pyproject.toml, scores in docs/mutation.md): slow,
# so not part of `make test` or CI. MUTANTS picks mutants by name pattern (whole modules, or the security-relevant
# functions of larger ones), e.g. `make mutate MUTANTS='llmconfigs.pricing.*'`; the work copy and results are in mutants/.
MUTANTS ?= llmconfigs.encryption.* llmconfigs.secrets.* llmconfigs.management.commands.rotate_field_key.* \
	llmconfigs.pricing.* llmconfigs.services.x_llm_config_record_usage* llmconfigs.rotation.* difyapi.selectors.* \
	agentcore.services.x_approval_* difyapi.auth.* agentcore.network.* agentcore.remote_files.* \
	agentcore.tools.builtin.x_http_check_url* agentcore.tools.policies.x_tool_policy_update* agentcore.limits.* \
	agentcore.permissions.* opsagent.common.permissions.* llmconfigs.usage.x_provider_calls_record* \
	llmconfigs.usage.x_histogram_* llmconfigs.usage.x_rollup_packed* llmconfigs.usage.x__cost_units* \
	llmconfigs.usage.x__cost_text* llmconfigs.usage.x__fields* llmconfigs.usage.xǁTotalsǁadd_call* \
	llmconfigs.usage.x_bucket_start* llmconfigs.usage.x_bucket_length* llmconfigs.usage.x_usage_rollup* \
	llmconfigs.usage.x__rollup_batch* llmconfigs.usage.x__upsert* llmconfigs.usage.x_usage_prune*

mutate: install-dev
	nice -n 10 $(VENV)/bin/mutmut run --max-children 1 $(foreach m,$(MUTANTS),'$(m)')
	@echo "Surviving mutants (inspect one with: $(VENV)/bin/mutmut show NAME):"
	@$(VENV)/bin/mutmut results | grep -v ': not checked$$' || echo "    none"
