# The two commands of the README, plus the pieces they are made of.
#   make demo   install what is missing, build, train the tiny Llama on the Brown corpus
#   make test   install what is missing, build, run every test but the slow ones
# The build uses CUDA when nvcc is found (GPU tests skip without a GPU), the CPU otherwise.

PRESET ?= auto
BUILD_DIR := build/$(PRESET)
JOBS ?= $(shell nproc)

.PHONY: all deps configure build test demo clean format

all: build

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake --preset $(PRESET) -DTANDEM_WERROR=$(if $(CI),ON,OFF) > /dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) -LE slow --timeout 900

demo: build
	@scripts/demo.sh $(BUILD_DIR)

clean:
	rm -rf build

format:
	@git ls-files '*.h' '*.cc' '*.cu' '*.cuh' | xargs clang-format -i
