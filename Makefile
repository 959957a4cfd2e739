# imd: build, run, test, bench, lint. `make help` lists the targets.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
GO          ?= go
BIN         ?= bin
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Iterations per fuzz target in `make test` (a count, not a time: Go's
# -fuzztime with a duration can overrun on a loaded machine).
FUZZ_N      ?= 3000
FUZZ_TARGETS = ./schema:FuzzDecoder ./schema:FuzzBodies ./gateway:FuzzConnInput ./gateway:FuzzTLSConnInput ./internal/rpc:FuzzLinkInput
SERVICES    = bash scripts/services.sh
# Exports IMD_TEST_CASSANDRA, IMD_TEST_CASSANDRA_DC2, IMD_TEST_KAFKA,
# IMD_TEST_REDIS and IMD_TEST_REDIS_CLUSTER_DC1/_DC2 for the real-server
# suites (the loopback two-DC world: docs/operations.md).
WITH_SERVICES = eval "$$($(SERVICES) env)" &&

.PHONY: help build run test test-quick test-go test-real fuzz-short fuzz bench bench-steady bench-go lint proto clean services-up services-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

build: ## build imd and imbench into ./bin
	$(GO) build -o $(BIN)/ ./cmd/...

run: ## run the whole platform in one process (imd all)
	$(GO) run ./cmd/imd all

test: services-up test-go test-real fuzz-short ## everything CI runs: starts Redis, Cassandra and Kafka (scripts/services.sh), then every suite

test-quick: test-go fuzz-short ## every suite that needs no outside server

services-up: ## start real Redis (and a Redis Cluster per DC), Cassandra (a node per DC) and Kafka on loopback (first run fetches jars)
	$(SERVICES) up

services-down: ## stop them
	$(SERVICES) down

# Every package but das/cassandra, whose tests need a server (test-real).
LOCAL_PKGS = $$($(GO) list ./... | grep -v /das/cassandra)

test-go:
	$(GO) test -race -count=1 -timeout 30m $(LOCAL_PKGS)
	@echo "== the end-to-end suite again on the goroutine gateway engine (the default is epoll):"
	IMD_GATEWAY_ENGINE=goroutine $(GO) test -race -count=1 -timeout 20m ./internal/platform/ ./cmd/imd/
	@echo "== without the race detector: soak and crash tests at full size, allocation and pool tests:"
	$(GO) test -count=1 -timeout 20m -run 'Soak|Crash|Allocs|NoShare|Reuse' -v ./internal/platform/ ./das/embedded/ ./schema/ ./cmd/imd/

test-real: ## the suites that run on real Redis, Cassandra and Kafka (services-up first)
	@echo "== das conformance and engine tests on Cassandra (and across its two DCs), bus tests on Kafka:"
	$(WITH_SERVICES) CI=true $(GO) test -race -count=1 -timeout 20m ./das/cassandra/ ./schema/cql/ ./bus/
	@echo "== the router's conformance suite and Redis tests on DC1's Redis Cluster:"
	$(WITH_SERVICES) CI=true IMD_TEST_REDIS_MODE=cluster $(GO) test -race -count=1 -timeout 10m ./router/
	@echo "== the cluster tests end to end with membership and the router on DC1's Redis Cluster (one seed: rueidis finds the rest):"
	$(WITH_SERVICES) CI=true IMD_TEST_SHAPE=split IMD_TEST_REDIS=$${IMD_TEST_REDIS_CLUSTER_DC1%%,*} $(GO) test -race -count=1 -timeout 10m -run 'Cluster|TwoDCs|Presence' ./internal/platform/
	$(WITH_SERVICES) CI=true IMD_TEST_REDIS=$${IMD_TEST_REDIS_CLUSTER_DC1%%,*} $(GO) test -count=1 -timeout 10m -run 'TestGatewayCrashPurgesSessions|TestGroupLogicNodeKilled' ./cmd/imd/
	@echo "== c2s end to end into the real Kafka:"
	$(WITH_SERVICES) IMD_TEST_BUS=kafka $(GO) test -race -count=1 -timeout 10m -run 'C2S' ./internal/platform/
	@echo "== c2c, s2c and the 20,000-message soak end to end with --store cassandra:"
	$(WITH_SERVICES) IMD_TEST_STORE=cassandra $(GO) test -count=1 -timeout 20m -run 'C2C|History|S2C|OpenAPI|Cluster|Group|Push|Trace|Conv|Transient|Presence' -v ./internal/platform/ | grep -E '^(---|ok|FAIL|PASS|panic)|soak_test'
	@echo "== the end-to-end suite again over the many-process wiring: logic and gateway linked by the internal RPC, router and membership in Redis:"
	$(WITH_SERVICES) CI=true IMD_TEST_SHAPE=split $(GO) test -race -count=1 -timeout 20m ./internal/platform/
	@echo "== fault tests: Cassandra (DC1's node under load, then DC2's), then Kafka, stopped and restarted:"
	$(WITH_SERVICES) CI=true IMD_TEST_CASSANDRA_FAULT=1 $(GO) test -count=1 -timeout 10m -run 'Fault' -v ./das/cassandra/ | grep -E '^(---|ok|FAIL|PASS|panic)|fault_test|twodc_test'
	$(WITH_SERVICES) CI=true IMD_TEST_KAFKA_FAULT=1 $(GO) test -count=1 -timeout 10m -run 'Restart' -v ./bus/ | grep -E '^(---|ok|FAIL|PASS|panic)|restart_test'
	@echo "== fault tests: a master of DC1's Redis Cluster killed and restarted empty (the router, then end to end), one package at a time:"
	$(WITH_SERVICES) CI=true IMD_TEST_REDIS_CLUSTER_FAULT=1 $(GO) test -p 1 -count=1 -timeout 10m -run 'MasterRestart' -v ./router/ ./internal/platform/ | grep -E '^(---|ok|FAIL|PASS|panic)|_test.go'
	@echo "== two data centers of real processes (2 logic + 2 gateways in dc1, 1 + 1 in dc2), every message counted through drills: a gateway, a logic node, a Redis master and DC2's Cassandra node SIGKILLed, the link between the DCs cut:"
	$(WITH_SERVICES) CI=true IMD_TEST_TWO_DC=1 $(GO) test -count=1 -timeout 15m -run 'TwoDCDrills' -v ./cmd/imd/ | grep -E '^(---|ok|FAIL|PASS|panic)|twodc_test'

fuzz-short: ## run every fuzz target briefly from its seed corpus
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "fuzz $$pkg $$fn ($(FUZZ_N) execs)"; \
		$(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZ_N)x $$pkg; \
	done

fuzz: ## fuzz one target for long: make fuzz T=./schema:FuzzDecoder TIME=10m
	$(GO) test -run '^$$' -fuzz "^$(word 2,$(subst :, ,$(T)))\$$" -fuzztime $(or $(TIME),5m) $(word 1,$(subst :, ,$(T)))

RESULTS      ?= results
IMBENCH       = $(BIN)/imbench
IMBENCH_ARGS  = --imd $(BIN)/imd --results-dir $(RESULTS)

# s2c-dispatch and s2c-broadcast are issue 16's shapes: 5,000 lean clients
# online, 4 pushers, each push to 50 random ones (POST /v1/push) or to all
# of them (POST /v1/broadcast).
bench: build ## short profile of every imbench scenario (~3-4 min on 2 cores): JSON + SVG charts into results/
	$(IMBENCH) conns   $(IMBENCH_ARGS) --json conns.json   --steps 1000,5000,10000 --settle 5s
	$(IMBENCH) conns   $(IMBENCH_ARGS) --json conns-cluster.json -n 30000 --gateways 2 --client raw --settle 5s
	$(IMBENCH) c2c     $(IMBENCH_ARGS) --json c2c.json     --rates 2000,4000,8000 --duration 2s --repeat 3
	$(IMBENCH) s2c     $(IMBENCH_ARGS) --json s2c.json     --rates 10,20,40 --duration 2s --repeat 3
	$(IMBENCH) s2c     $(IMBENCH_ARGS) --json s2c-dispatch.json  --shape dispatch  --clients 5000 --rates 400,800,1200 --duration 2s --repeat 2 --drain 10s
	$(IMBENCH) s2c     $(IMBENCH_ARGS) --json s2c-broadcast.json --shape broadcast --endpoint broadcast --clients 5000 --rates 8,16,64 --duration 2s --repeat 2 --drain 10s
	$(IMBENCH) group   $(IMBENCH_ARGS) --json group.json   --members 1000 --online 500 --rates 10,20,40 --duration 2s --repeat 2
	$(IMBENCH) c2s     $(IMBENCH_ARGS) --json c2s.json     --rates 2000,4000,8000 --duration 2s --repeat 3
	$(IMBENCH) offline $(IMBENCH_ARGS) --json offline.json -n 20000 --page-size 500 --repeat 3

bench-steady: build ## c2c for 65 s at 8,000 msgs/s, three runs: the steady state, with the janitor's sweeps and Pebble's compactions that 2-s runs miss
	$(IMBENCH) c2c     $(IMBENCH_ARGS) --json c2c-steady.json --rates 8000 --duration 65s --repeat 3

bench-go: ## Go micro-benchmarks (codec, store) and the in-process end-to-end ones
	$(GO) test -run '^$$' -bench . -benchmem ./schema/ ./das/embedded/
	$(GO) test -run '^$$' -bench 'WriteCost|LookupMany' -count 3 ./gateway/ ./router/
	$(GO) test -run '^$$' -bench 'C2CEndToEnd|C2SEndToEnd' -benchtime 5000x ./internal/platform/
	$(GO) test -run '^$$' -bench S2CFanOut -benchtime 100x ./internal/platform/
	$(GO) test -run '^$$' -bench C2COverSlowLink -benchtime 64x ./internal/platform/

lint: ## gofmt, go vet and staticcheck must be clean
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

proto: ## regenerate schema/pb (needs protoc and protoc-gen-go)
	$(GO) generate ./schema/

clean:
	rm -rf $(BIN) results

# The demo chat page (internal/web). Its SDK bundle is committed, so only
# these targets need Node; CI (.ci/run) installs Chromium and the npm
# packages first.
.PHONY: web test-web test-ts web-deps
test: test-ts test-web

# The browser test drives Debian's Chromium and both Node folders need their
# npm packages: install what is missing, so `make test` works on a fresh
# machine (apt needs root; CI runs as root).
web-deps:
	@command -v chromium >/dev/null || { sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; $$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium; }
	@for d in sdk-ts internal/web; do [ -d $$d/node_modules ] || (cd $$d && npm ci --no-audit --no-fund); done

test-ts: web-deps ## the TypeScript SDK (sdk-ts): build, then its tests against a real imd over WebSocket and long-poll
	$(GO) build -o $(BIN)/ ./cmd/imd ./internal/testpeer
	cd sdk-ts && npm run build && IMD_BIN=$(abspath $(BIN))/imd IMD_TESTPEER_BIN=$(abspath $(BIN))/testpeer npm test

web: ## rebuild the demo page's SDK bundle (internal/web/static/imd-sdk.js) from sdk-ts with esbuild
	cd sdk-ts && npm ci --no-audit --no-fund
	cd internal/web && npm ci --no-audit --no-fund && node build.mjs

test-web: web-deps ## the demo page in headless Chromium against a real imd all (Node 20, Debian's chromium)
	cd internal/web && node build.mjs --check
	$(GO) build -o $(BIN)/imd ./cmd/imd
	cd internal/web && IMD_BIN=$(abspath $(BIN))/imd node --test --test-concurrency=1 test/
