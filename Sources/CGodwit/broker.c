// The VMM's network broker: the one piece of the VMM that stays in the caller's namespaces.
//
// `godwit vm` runs in its own user, mount, IPC, network and PID namespaces (sandbox.c's constructor).
// Two things it needs live in the caller's network namespace: the TAPs it was told to use (by name,
// or a new one), and TCP sockets for live migration. Before the constructor unshares, it forks this
// broker, a small single-threaded C loop (it never returns into Swift) that answers, over a
// SOCK_SEQPACKET socketpair, exactly four requests:
//   SOCKET  a TCP socket (AF_INET/AF_INET6, SOCK_STREAM) created in the caller's network namespace;
//           the VMM binds, listens or connects it itself.
//   TAP     open /dev/net/tun and attach the TAP by name (or a new one), always TAP|NO_PI|VNET_HDR.
//   LINK    bring a TAP this broker opened up or down.
//   SEAL    from now on answer SOCKET only (the VMM seals once its devices are set up).
// Everything else is refused with EINVAL or EPERM. The broker dies with the VMM (PDEATHSIG) and
// exits when the VMM closes its end. Prior art: Chromium's broker process, crosvm's jail helpers.
#define _GNU_SOURCE
#include "CGodwit.h"
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/if_tun.h>

enum { BROKER_SOCKET = 1, BROKER_TAP = 2, BROKER_LINK = 3, BROKER_SEAL = 4 };

struct broker_request {
    int32_t op;
    int32_t a, b, c;        // SOCKET: domain, type, protocol; LINK: up
    char name[IFNAMSIZ];    // TAP, LINK: interface name (NUL-terminated; empty for a new TAP)
};

struct broker_reply {
    int32_t error;          // 0 or an errno value
    char name[IFNAMSIZ];    // TAP: the attached interface's name
};

static int broker_socket = -1;
static pthread_mutex_t broker_lock = PTHREAD_MUTEX_INITIALIZER;

int godwit_broker_available(void) { return broker_socket >= 0; }

// MARK: - The broker process

#define BROKER_MAX_TAPS 64

static int name_is_valid(const char *name) {
    size_t length = strnlen(name, IFNAMSIZ);
    return length < IFNAMSIZ;
}

__attribute__((noreturn)) static void broker_serve(int sock, pid_t parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (getppid() != parent) _exit(0);
    prctl(PR_SET_NAME, "godwit-broker", 0, 0, 0);
    // Terminal signals go to the VMM, which decides; the broker ends when the VMM's end closes.
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    // Hold nothing of the VMM's but this socket (stderr stays, for nothing but a crash message).
    if (sock != 3) {
        if (dup2(sock, 3) < 0) _exit(70);
        sock = 3;
    }
    syscall(SYS_close_range, 4, ~0U, 0);
    close(0);
    close(1);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);

    char taps[BROKER_MAX_TAPS][IFNAMSIZ];
    int tap_count = 0;
    int sealed = 0;
    for (;;) {
        struct broker_request request;
        int ignored_fds[1], nfds = 0, truncated = 0;
        long n = godwit_recv_fds(sock, &request, sizeof request, ignored_fds, 1, &nfds, &truncated);
        if (n == 0) _exit(0);
        if (n < 0) _exit(errno == ECONNRESET ? 0 : 70);
        for (int i = 0; i < nfds; i++) close(ignored_fds[i]);

        struct broker_reply reply;
        memset(&reply, 0, sizeof reply);
        int fd = -1;
        if (n != (long)sizeof request || nfds != 0 || truncated) {
            reply.error = EINVAL;
        } else if (request.op == BROKER_SOCKET) {
            int base = request.b & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
            if ((request.a != AF_INET && request.a != AF_INET6) || base != SOCK_STREAM
                || (request.c != 0 && request.c != IPPROTO_TCP)) {
                reply.error = EPERM;
            } else {
                fd = socket(request.a, request.b | SOCK_CLOEXEC, request.c);
                if (fd < 0) reply.error = errno;
            }
        } else if (request.op == BROKER_TAP) {
            if (sealed) reply.error = EPERM;
            else if (!name_is_valid(request.name)) reply.error = EINVAL;
            else if (tap_count == BROKER_MAX_TAPS) reply.error = EMFILE;
            else {
                fd = godwit_tap_attach(request.name[0] ? request.name : NULL, reply.name);
                if (fd < 0) reply.error = errno;
                else memcpy(taps[tap_count++], reply.name, IFNAMSIZ);
            }
        } else if (request.op == BROKER_LINK) {
            int known = 0;
            if (name_is_valid(request.name)) {
                for (int i = 0; i < tap_count && !known; i++) known = strncmp(taps[i], request.name, IFNAMSIZ) == 0;
            }
            if (sealed || !known) reply.error = EPERM;
            else reply.error = godwit_interface_set_up_here(request.name, request.a != 0) == 0 ? 0 : errno;
        } else if (request.op == BROKER_SEAL) {
            sealed = 1;
        } else {
            reply.error = EINVAL;
        }
        long sent = godwit_send_fds(sock, &reply, sizeof reply, fd >= 0 ? &fd : NULL, fd >= 0 ? 1 : 0);
        if (fd >= 0) close(fd);
        if (sent < 0) _exit(0);
    }
}

int godwit_broker_start(void) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) return -1;
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) {
        int saved = errno;
        close(pair[0]);
        close(pair[1]);
        errno = saved;
        return -1;
    }
    if (child == 0) {
        close(pair[0]);
        broker_serve(pair[1], parent);
    }
    close(pair[1]);
    broker_socket = pair[0];
    return 0;
}

// MARK: - The VMM's side

/// One request and its reply; returns the passed descriptor (or 0 when none came) or -1 with errno.
static int broker_call(const struct broker_request *request, struct broker_reply *reply) {
    pthread_mutex_lock(&broker_lock);
    int fd = -1, nfds = 0, truncated = 0, code = 0;
    if (godwit_send_fds(broker_socket, request, sizeof *request, NULL, 0) < 0) {
        code = errno;
    } else {
        long n = godwit_recv_fds(broker_socket, reply, sizeof *reply, &fd, 1, &nfds, &truncated);
        if (n < 0) code = errno;
        else if (n != (long)sizeof *reply || truncated) code = EPROTO;
        else if (reply->error != 0) code = reply->error;
    }
    pthread_mutex_unlock(&broker_lock);
    if (code != 0 || (nfds == 0 && request->op != BROKER_SEAL && request->op != BROKER_LINK)) {
        if (nfds > 0) close(fd);
        errno = code != 0 ? code : EPROTO;
        return -1;
    }
    return nfds > 0 ? fd : 0;
}

int godwit_host_socket(int domain, int type, int protocol) {
    if (broker_socket < 0) return socket(domain, type | SOCK_CLOEXEC, protocol);
    struct broker_request request = {BROKER_SOCKET, domain, type, protocol, {0}};
    struct broker_reply reply;
    int fd = broker_call(&request, &reply);
    // The broker always sets close-on-exec; non-blocking is a file status flag, carried by the description.
    return fd;
}

int godwit_broker_tap_open(const char *name, char *actual_name) {
    struct broker_request request = {BROKER_TAP, 0, 0, 0, {0}};
    if (name) strncpy(request.name, name, IFNAMSIZ - 1);
    struct broker_reply reply;
    int fd = broker_call(&request, &reply);
    if (fd >= 0) {
        memcpy(actual_name, reply.name, IFNAMSIZ);
        actual_name[IFNAMSIZ - 1] = 0;
    }
    return fd;
}

int godwit_broker_set_link(const char *name, int up) {
    struct broker_request request = {BROKER_LINK, up ? 1 : 0, 0, 0, {0}};
    strncpy(request.name, name, IFNAMSIZ - 1);
    struct broker_reply reply;
    return broker_call(&request, &reply) < 0 ? -1 : 0;
}

int godwit_broker_seal(void) {
    if (broker_socket < 0) return 0;
    struct broker_request request = {BROKER_SEAL, 0, 0, 0, {0}};
    struct broker_reply reply;
    return broker_call(&request, &reply) < 0 ? -1 : 0;
}
