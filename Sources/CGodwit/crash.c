// A crash report for every godwit process (VMM, I/O domain, agent, NBD server): on SIGSEGV, SIGBUS,
// SIGILL (Swift's traps), SIGFPE and SIGTRAP it writes one line with the signal, the faulting address
// and the thread's name, then the return addresses of the stack, each also as an offset into the
// godwit executable (for `addr2line -f -e godwit OFFSET | swift demangle`), and dies of the signal.
//
// The handler only calls write, backtrace (pre-loaded at install time so that it does not dlopen
// libgcc_s inside the handler) and sigaction: no malloc, no stdio, no loader lock. Those calls are in
// every sandbox allow-list. Set GODWIT_NO_CRASH_REPORT=1 to keep the default actions (core dumps).
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <dlfcn.h>

static uintptr_t executable_base = 0;
static char crash_stack[64 * 1024];

static void put(const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void put_hex(uintptr_t value) {
    char buffer[2 + 16 + 1];
    char *p = buffer + sizeof buffer - 1;
    *p = 0;
    do {
        *--p = "0123456789abcdef"[value & 0xf];
        value >>= 4;
    } while (value != 0 && p > buffer + 2);
    *--p = 'x';
    *--p = '0';
    put(p);
}

static void put_decimal(long value) {
    char buffer[24];
    char *p = buffer + sizeof buffer - 1;
    *p = 0;
    unsigned long v = value < 0 ? (unsigned long)-value : (unsigned long)value;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0 && p > buffer + 1);
    if (value < 0) *--p = '-';
    put(p);
}

static void crash_handler(int signo, siginfo_t *info, void *context) {
    (void)context;
    char name[17] = {0};
    prctl(PR_GET_NAME, name, 0, 0, 0);
    put("godwit: fatal signal ");
    put_decimal(signo);
    put(" (");
    put(sigabbrev_np(signo) ? sigabbrev_np(signo) : "?");
    put(") at address ");
    put_hex((uintptr_t)info->si_addr);
    put(" in thread ");
    put_decimal((long)gettid());
    put(" \"");
    put(name);
    put("\"; executable base ");
    put_hex(executable_base);
    put("; stack:\n");
    void *frames[64];
    int count = backtrace(frames, 64);
    for (int i = 0; i < count; i++) {
        uintptr_t address = (uintptr_t)frames[i];
        put("  #");
        put_decimal(i);
        put(" ");
        put_hex(address);
        if (executable_base != 0 && address > executable_base && address - executable_base < ((uintptr_t)1 << 30)) {
            put(" godwit+");
            put_hex(address - executable_base);
        }
        put("\n");
    }
    // Die of the same signal: the default action, then the faulting instruction runs again (or, for a
    // signal that was sent, raise it once more).
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = SIG_DFL;
    sigemptyset(&action.sa_mask);
    sigaction(signo, &action, NULL);
    if (info->si_code <= 0) raise(signo);
}

__attribute__((constructor)) static void godwit_install_crash_reporter(void) {
    const char *off = getenv("GODWIT_NO_CRASH_REPORT");
    if (off != NULL && off[0] == '1') return;
    Dl_info self;
    if (dladdr((void *)&godwit_install_crash_reporter, &self) != 0) executable_base = (uintptr_t)self.dli_fbase;
    void *warm[2];
    (void)backtrace(warm, 2); // loads libgcc_s now, not in the handler
    stack_t alternate = {.ss_sp = crash_stack, .ss_size = sizeof crash_stack, .ss_flags = 0};
    sigaltstack(&alternate, NULL); // the main thread's stack overflow is reported too
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = crash_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    const int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP};
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++) sigaction(signals[i], &action, NULL);
}
