# imd: build, run, test, bench, lint. `make help` lists the targets.
GO          ?= go
BIN         ?= bin
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Iterations per fuzz target in `make test` (a count, not a time: Go's
# -fuzztime with a duration can overrun on a loaded machine).
FUZZ_N      ?= 3000
FUZZ_TARGETS = ./schema:FuzzDecoder ./schema:FuzzBodies ./gateway:FuzzConnInput

.PHONY: help build run test test-go fuzz-short fuzz bench lint proto clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

build: ## build imd and imbench into ./bin
	$(GO) build -o $(BIN)/ ./cmd/...

run: ## run the whole platform in one process (imd all)
	$(GO) run ./cmd/imd all

test: test-go fuzz-short ## the test suite CI runs: race-enabled tests, then short fuzzing

test-go:
	$(GO) test -race -count=1 -timeout 30m ./...
	@echo "the end-to-end suite again on the goroutine gateway engine (the default is epoll):"
	IMD_GATEWAY_ENGINE=goroutine $(GO) test -race -count=1 -timeout 20m ./internal/platform/ ./cmd/imd/
	@echo "without the race detector: soak and crash tests at full size, allocation and pool tests:"
	$(GO) test -count=1 -timeout 20m -run 'Soak|Crash|Allocs|NoShare|Reuse' -v ./internal/platform/ ./das/... ./schema/ ./cmd/imd/

fuzz-short: ## run every fuzz target briefly from its seed corpus
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "fuzz $$pkg $$fn ($(FUZZ_N) execs)"; \
		$(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZ_N)x $$pkg; \
	done

fuzz: ## fuzz one target for long: make fuzz T=./schema:FuzzDecoder TIME=10m
	$(GO) test -run '^$$' -fuzz "^$(word 2,$(subst :, ,$(T)))\$$" -fuzztime $(or $(TIME),5m) $(word 1,$(subst :, ,$(T)))

bench: build ## micro-benchmarks, then the imbench scenarios (short profile)
	$(GO) test -run '^$$' -bench . -benchmem ./schema/
	$(BIN)/imbench conns -n 2000 --imd $(BIN)/imd --json results/conns.json

lint: ## gofmt, go vet and staticcheck must be clean
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

proto: ## regenerate schema/pb (needs protoc and protoc-gen-go)
	$(GO) generate ./schema/

clean:
	rm -rf $(BIN) results
