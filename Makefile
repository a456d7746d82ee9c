# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: demo test bench setup setup-dev

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

# Generate analytic data, train the small model for a few minutes, evaluate, write a report.
demo: setup
	.venv/bin/dota demo

# The whole test suite (CI runs this through .ci/run).
test: setup-dev
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/dota bench --out runs/bench
