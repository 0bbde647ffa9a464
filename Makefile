# The two commands: `make run` (set up and serve on 127.0.0.1:8000) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MANAGE := DJANGO_READ_DOT_ENV_FILE=1 $(PY) manage.py

.PHONY: run test install install-dev lint bench mutate

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(PY)
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(PIP) install -q -r requirements-dev.txt
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

run: install .env
	$(MANAGE) migrate --noinput
	$(MANAGE) collectstatic --noinput -v0
	$(MANAGE) seed --templates
	@echo "Serving OpsAgent on http://127.0.0.1:8000 (admin: http://127.0.0.1:8000/admin/, Dify API: http://127.0.0.1:8000/v1)"
	DJANGO_READ_DOT_ENV_FILE=1 $(VENV)/bin/daphne -b 127.0.0.1 -p 8000 opsagent.asgi:application

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
	agentcore.tools.builtin.x_http_check_url* agentcore.permissions.* opsagent.common.permissions.*

mutate: install-dev
	nice -n 10 $(VENV)/bin/mutmut run --max-children 1 $(foreach m,$(MUTANTS),'$(m)')
	@echo "Surviving mutants (inspect one with: $(VENV)/bin/mutmut show NAME):"
	@$(VENV)/bin/mutmut results | grep -v ': not checked$$' || echo "    none"
