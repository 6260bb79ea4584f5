# Godwit: `make run` boots the test guest with a disk; `make test` runs every test tier.
SWIFT ?= swift
GUEST := guest/out/guest.elf
GODWIT := .build/debug/godwit
DEMO_DISK := out/demo.img

.PHONY: all deps guest build linux run run-linux debian-kernel-report demo-net-down shell shell-nonet test unit fuzz sanitize bench clean

all: build guest

deps:
	@scripts/install-deps.sh

guest: deps
	@$(MAKE) -s -C guest

build: deps
	$(SWIFT) build

$(DEMO_DISK):
	@mkdir -p out && truncate -s 64M $(DEMO_DISK)

DEMO_NS := godwit-demo
DEMO_BRIDGE := gwdemo

# Boots the test guest with 2 vCPUs, a 64 MiB disk and a NIC (on a bridge, 10.77.0.1/24, in the network
# namespace $(DEMO_NS)), each served by an I/O domain that godwit starts, sandboxes and restarts if it dies
# (`--disk iodomain=`, `--net ...,iodomain`: vhost-user, the TAP passed in), and runs a short demo of its
# jobs; during the last 20 seconds it answers ping: `ip netns exec $(DEMO_NS) ping 10.77.0.2`.
# `make demo-net-down` removes the namespace.
run: guest build $(DEMO_DISK)
	@scripts/testnet.sh up --netns $(DEMO_NS) --bridge $(DEMO_BRIDGE) --taps 1 --addr 10.77.0.1/24 >/dev/null
	ip netns exec $(DEMO_NS) $(GODWIT) vm --kernel $(GUEST) --cpus 2 --memory 256M --disk iodomain=$(DEMO_DISK) \
	  --net tap=$(DEMO_BRIDGE)t0,mac=52:54:00:77:00:02,iodomain \
	  --cmdline "godwit.ip=10.77.0.2/24 godwit.job=ready godwit.job=blk-verify,size=4194304 godwit.job=blk-check,size=4194304 godwit.job=blk-bench,rw=randread,n=2000,qd=8 godwit.job=dirty,mib=16,rate=64,seconds=1 godwit.job=net-ping,dst=10.77.0.1,count=20 godwit.job=net-echo,seconds=20"

demo-net-down:
	@scripts/testnet.sh down --netns $(DEMO_NS) --bridge $(DEMO_BRIDGE) --taps 1

# An interactive prompt on the guest's serial console (type `help`, `info`, `poweroff`).
shell: guest build $(DEMO_DISK)
	@scripts/testnet.sh up --netns $(DEMO_NS) --bridge $(DEMO_BRIDGE) --taps 1 --addr 10.77.0.1/24 >/dev/null
	ip netns exec $(DEMO_NS) $(GODWIT) vm --kernel $(GUEST) --cpus 2 --memory 256M --disk $(DEMO_DISK) \
	  --net tap=$(DEMO_BRIDGE)t0,mac=52:54:00:77:00:02 --cmdline "godwit.ip=10.77.0.2/24 godwit.job=shell"

shell-nonet: guest build $(DEMO_DISK)
	$(GODWIT) vm --kernel $(GUEST) --cpus 2 --memory 256M --disk $(DEMO_DISK) --cmdline "godwit.job=shell"

# The Linux guest: the project's kernel (linux/config, linux/patches) and initramfs (linux/init),
# built into a cache outside the repo keyed by their inputs, linked under out/linux/.
LINUX_DIR := out/linux
linux: deps
	@mkdir -p $(LINUX_DIR)
	@k=$$(scripts/build-linux.sh | tail -n1) && ln -sfn "$$k" $(LINUX_DIR)/vmlinux && ln -sfn "$$(dirname "$$k")/bzImage" $(LINUX_DIR)/bzImage
	@i=$$(scripts/build-initramfs.sh | tail -n1) && ln -sfn "$$i" $(LINUX_DIR)/initramfs.cpio
	@ls -lL $(LINUX_DIR)

LINUX_CMDLINE := console=ttyS0 pci=off tsc=reliable no_timer_check i8042.noaux i8042.nomux i8042.dumbkbd reboot=k panic=-1

# Boots Linux to a shell on the console with a disk and a NIC on the demo bridge (about 25 s to the
# prompt on this PVM host, well under a second of kernel time on a VMX/SVM host). `exit` powers off.
run-linux: linux build $(DEMO_DISK)
	@scripts/testnet.sh up --netns $(DEMO_NS) --bridge $(DEMO_BRIDGE) --taps 1 --addr 10.77.0.1/24 >/dev/null
	@echo "godwit: booting Linux (kernel code is emulated on this KVM: about 25 s to the shell)"
	ip netns exec $(DEMO_NS) $(GODWIT) vm --kernel $(LINUX_DIR)/vmlinux --initrd $(LINUX_DIR)/initramfs.cpio --cpus 2 --memory 256M \
	  --disk $(DEMO_DISK) --net tap=$(DEMO_BRIDGE)t0,mac=52:54:00:77:00:02 \
	  --cmdline "$(LINUX_CMDLINE) godwit.ip=10.77.0.2/24 godwit.job=ready godwit.job=shell"

# Boots Debian's stock kernel package (downloaded, never installed; its virtio drivers are modules, loaded
# from the initramfs) and reports how far it gets: the ready line on a VMX/SVM host; on kvm_pvm what stops it.
DEBIAN_KERNEL_TIMEOUT ?= 600
debian-kernel-report: build
	scripts/debian-kernel-report.sh --godwit $(GODWIT) --timeout $(DEBIAN_KERNEL_TIMEOUT)

# Every tier: unit (no KVM), integration (KVM + test guest), interop (QEMU runs the same guest), then
# every fuzz target for a short bounded time (the corpus, then FUZZ_SMOKE_SECONDS of new inputs each).
FUZZ_SMOKE_SECONDS ?= 20
# Then SOAK_SMOKE_MINUTES of the soak (bench/soak, on the debug build; below).
# Then the unit and integration tiers again under ASan (VMMs and I/O domains ASan-built too) and
# TSan (the suites whose Godwit code runs in the test process; see scripts/sanitize.sh). The multi-host
# agent suite runs under ASan too (about 5 minutes alone on two CPUs; on a machine loaded by other work
# its guests can outrun its waits). The Linux tier is left out of the ASan run here (its ~4 minutes are
# the guest kernel at emulation speed, and it ran above; the VMM's boot paths run under ASan in the
# boot suite); `make sanitize` runs it. The ASan run is about 26 minutes on two CPUs.
test: guest build linux
	$(SWIFT) test --no-parallel
	scripts/fuzz.sh $(FUZZ_SMOKE_SECONDS)
	bench/soak --minutes $(SOAK_SMOKE_MINUTES) --no-build --godwit $(GODWIT) --skip-if-unavailable
	SANITIZE_ADDRESS_SKIP=LinuxTests scripts/sanitize.sh

sanitize: guest build
	scripts/sanitize.sh

# Every fuzz target for FUZZ_SECONDS each (libFuzzer + AddressSanitizer).
FUZZ_SECONDS ?= 300
fuzz: build
	scripts/fuzz.sh $(FUZZ_SECONDS)

# The soak (bench/soak, root): two test guests on two hosts (network namespaces) run blk-verify and
# net-echo while they are paused, migrated back and forth, their I/O domains killed, their disks failed
# over to the replica and their API hammered; it fails on any guest error, lost byte, crash or wrong API
# answer. `make soak` runs 30 minutes on the release build; `make test` SOAK_SMOKE_MINUTES on the debug one.
SOAK_SMOKE_MINUTES ?= 3
.PHONY: soak
soak: guest
	bench/soak

unit: build
	$(SWIFT) test --filter UnitTests

bench: guest linux
	bench/boot
	bench/linux-boot
	bench/net
	bench/api
	bench/blk
	bench/migrate

clean:
	rm -rf .build .build-fuzz .build-asan .build-tsan guest/out out
