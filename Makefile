# Godwit: `make run` boots the test guest with a disk; `make test` runs every test tier.
SWIFT ?= swift
GUEST := guest/out/guest.elf
GODWIT := .build/debug/godwit
DEMO_DISK := out/demo.img

.PHONY: all deps guest build run shell test unit bench clean

all: build guest

deps:
	@scripts/install-deps.sh

guest: deps
	@$(MAKE) -s -C guest

build:
	$(SWIFT) build

$(DEMO_DISK):
	@mkdir -p out && truncate -s 64M $(DEMO_DISK)

# Boots the test guest with 2 vCPUs and a 64 MiB disk and runs a short demo of its jobs.
run: guest build $(DEMO_DISK)
	$(GODWIT) vm --kernel $(GUEST) --cpus 2 --memory 256M --disk $(DEMO_DISK) \
	  --cmdline "godwit.job=ready godwit.job=blk-verify,size=4194304 godwit.job=blk-check,size=4194304 godwit.job=blk-bench,rw=randread,n=2000,qd=8,mode=irq godwit.job=dirty,mib=16,rate=64,seconds=1"

# An interactive prompt on the guest's serial console (type `help`, `info`, `poweroff`).
shell: guest build $(DEMO_DISK)
	$(GODWIT) vm --kernel $(GUEST) --cpus 2 --memory 256M --disk $(DEMO_DISK) --cmdline "godwit.job=shell"

# Every tier: unit (no KVM), integration (KVM + test guest), interop (QEMU runs the same guest).
test: guest build
	$(SWIFT) test --no-parallel

unit: build
	$(SWIFT) test --filter UnitTests

bench: guest
	bench/boot

clean:
	rm -rf .build guest/out out
