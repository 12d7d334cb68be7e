# The two commands of the README: `make demo` and `make test`. Both install what is missing first.
.PHONY: setup demo test lint

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/idempotent-worker demo

lint: setup
	.venv/bin/ruff check idempotent_worker examples tests scripts bench
	.venv/bin/ruff format --check idempotent_worker examples tests scripts bench
	.venv/bin/mypy
	.venv/bin/lint-imports

test: lint
	.venv/bin/pytest -n 3 --dist loadgroup
