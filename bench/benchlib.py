"""Pieces the benchmark scripts share: QMP, ports, process clean-up, memory of a process tree."""
import json, os, socket, subprocess, time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port



def wait_listening(port, timeout=10):
    needle = ":%04X 00000000:0000 0A" % port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if needle in f.read():
                return True
        time.sleep(0.01)
    return False



def pin_option(ap):
    """Adds --pin VCPU,IO (libvirt's vcpupin/emulatorpin): the vCPU thread on one CPU, the rest on another."""
    ap.add_argument("--pin", default="auto", help="VCPU,IO: the vCPU thread on CPU VCPU, every other VMM and back-end thread "
                    "on CPU IO, for every VMM alike; 'none': the scheduler places them; 'auto' (default): 0,1 with two or more CPUs")


def parse_pin(value):
    """--pin's value as (vcpu_cpu, io_cpu), or None to leave placement to the scheduler; exits on a bad value."""
    if value == "auto":
        return (0, 1) if os.cpu_count() >= 2 else None
    if value == "none":
        return None
    try:
        pin = tuple(int(c) for c in value.split(","))
        assert len(pin) == 2 and all(0 <= c < os.cpu_count() for c in pin)
        return pin
    except (ValueError, AssertionError):
        raise SystemExit(f"--pin: VCPU,IO with two CPU numbers below {os.cpu_count()}, 'none' or 'auto', not {value!r}")


def io_cpu(pin):
    """The command prefix that keeps a process (and the threads it starts) on the I/O CPU of `pin`."""
    return ["taskset", "-c", str(pin[1])] if pin else []


def pin_qemu_vcpus(qmp, pin):
    """Moves a QEMU's vCPU threads (QMP query-cpus-fast) to the vCPU CPU of `pin`."""
    if pin:
        for cpu in qmp.execute("query-cpus-fast"):
            os.sched_setaffinity(cpu["thread-id"], {pin[0]})


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



class QMP:
    def __init__(self, path, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command, arguments=None):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            # events: skip

    def close(self):
        self.sock.close()


def process_tree(pid):
    """pid and its descendants (a namespaced `godwit vm` is a waiting parent, the VMM and its broker)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return tree

def rss_excluding_guest(pid):
    """RssAnon + RssFile, and RssAnon, summed over the process tree (guest RAM is RssShmem, left out)."""
    total, anon, seen = 0, 0, False
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            kb = lambda k: int(fields.get(k, "0 kB").split()[0])
            total, anon, seen = total + kb("RssAnon") + kb("RssFile"), anon + kb("RssAnon"), True
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return (total, anon) if seen else None
