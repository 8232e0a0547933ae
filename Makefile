# capsule_ros: make setup | build | demo | test | gpu-test | clean
# Every recipe runs in bash with scripts/env.sh sourced (venv + this repo's install tree).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help
.PHONY: help setup build demo test gpu-test clean distclean check-aarch64

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
ENV  := . "$(ROOT)/scripts/env.sh"
PYTEST_ARGS ?=

help:
	@echo "capsule_ros targets:"
	@echo "  make setup     venv + pinned deps + /opt/python symlinks + colcon build (idempotent)"
	@echo "  make build     same as setup (colcon build is part of it; incremental)"
	@echo "  make demo      setup, then python -m capsule_ros.demo from the install tree"
	@echo "  make test      setup, ros2 tools overlay (.tools), then pytest -rs test (timeout 300 s/test)"
	@echo "  make gpu-test  GPU tests on a CUDA machine (wheels from scripts/gpu_wheels.sh)"
	@echo "  make check-aarch64  requirements-thor.txt resolves for aarch64/cp312 (needs PyPI; not in make test)"
	@echo "  make clean     remove build/ install/ log/ and test/demo outputs (keeps .venv)"
	@echo "  make distclean clean, and remove .venv and the ros2 tools overlay (.tools)"
	@echo "Use the install tree in a shell with:  . scripts/env.sh"

setup:
	@$(ENV); bash "$(ROOT)/scripts/setup.sh"

build: setup

# -P: do not put the cwd (repo root) on sys.path, or the source tree's capsule_ros (which has
# no generated capsule_ros.msg) would shadow the installed package.
demo: setup
	@$(ENV); cd "$(ROOT)" && python -P -m capsule_ros.demo

# The venv's pytest executable, not `python -m pytest`: the latter puts the repo root on
# sys.path and the source capsule_ros shadows the installed one (which holds capsule_ros.msg).
# The ros2 CLI tests need the tools overlay (.tools/, built and cached by tools_overlay.sh from
# ../shared/third_party; without the archive they skip, and with CI=true that is an error).
test: setup
	@$(ENV); cd "$(ROOT)"; \
	bash scripts/tools_overlay.sh; . scripts/tools_env.sh; \
	export ROS_DOMAIN_ID="$${ROS_DOMAIN_ID:-$$(( $$$$ % 100 + 1 ))}"; \
	echo "[test] ROS_DOMAIN_ID=$$ROS_DOMAIN_ID"; \
	"$$VIRTUAL_ENV/bin/pytest" -rs --timeout=300 -p no:cacheprovider $(PYTEST_ARGS) test

# On the GPU machine (no venv, no ROS): carried wheels into a temp target, then test/gpu.
gpu-test:
	@bash "$(ROOT)/scripts/gpu_test.sh"

# The robot's pin set against the registry (aarch64, CPython 3.12); needs network, not in `test`.
check-aarch64: setup
	@$(ENV); PYTHON="$$VIRTUAL_ENV/bin/python" bash "$(ROOT)/scripts/check_aarch64.sh"

clean:
	@$(ENV); cd "$(ROOT)" && rm -rf build install log ci_test.log demo_summary.json demo_out .pytest_cache .hypothesis
	@find "$(ROOT)" -path "$(ROOT)/.venv" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(ROOT)/.venv" "$(ROOT)/.tools"
