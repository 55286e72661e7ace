// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// Guest agent for the real-guest tests: runs as /init's successor (PID 1)
// inside a User-Mode Linux guest and answers one command per line read
// from the console.
//
// Protocol (version 1):
//   At start the agent prints   @@READY 1
//   Each non-empty input line is one command; the agent numbers them
//   1, 2, 3, ... and answers command n with
//     @@BEGIN <n> <command line as received>
//     @@<n> <text>              (zero or more body lines)
//     @@END <n> ok
//   or, on failure,
//     @@END <n> error <message>
//   Body lines carry the "@@<n> " prefix so that kernel messages
//   interleaved on the console can never be mistaken for output.
//
// Commands:
//   meminfo | buddyinfo | vmstat | zoneinfo   the /proc file, verbatim
//   dmesg            the kernel log buffer (klogctl READ_ALL)
//   features         for each virtio device with id 5: device=, device_id=,
//                    status=, driver=, features= (sysfs '0'/'1' string, bit 0
//                    first), features_hex=, feature_bits=, feature_names=;
//                    error if there is none
//   dirty <MiB>      in a child: mmap, write every page with non-zero data
//                    (after MADV_POPULATE_WRITE of each MiB), munmap; reports requested_mib= got_mib= touch_ms=
//                    free_ms= ms= mib_per_s=
//   alloc <MiB>      in a child that keeps it: mmap and write every page;
//                    reports requested_mib= got_mib= touch_ms= pid= ms=
//                    held_mib=; error (with got_mib=) if the child died, e.g.
//                    killed by the OOM killer
//   fill <MiB> [hold]  writes MiB of non-zero data with write(2) into a file
//                    on a tmpfs of its own (sized MiB), through the page cache:
//                    no user page faults, so about ten times faster than dirty
//                    under UML. Then deletes it (the pages go back to the
//                    allocator with their data), or with hold keeps it until
//                    release. Reports requested_mib= got_mib= ms= mib_per_s=
//                    (and held_fill_mib= with hold). The pages cannot be
//                    reclaimed (no swap): keep MiB below what the guest spares
//   held             one "alloc pid= mib= state=" line each, and held_mib=
//   release          kills the holding children and deletes held fills:
//                    released= freed_mib= ms=
//   sh <command>     /bin/sh -c <command>, stdout+stderr as body; error
//                    unless it exits with 0 (killed after 300 s)
//   echo <text>      <text> as the body
//   help             the command list
//   poweroff         answers ok, syncs and powers off (UML exits)
//   Anything else answers "error unknown command: ...".
//   At end of input the agent prints @@EOF and powers off (UML may not
//   pass the end of its stdin on to the console: keep it open instead).
//
// Build: gcc -O2 -static -o guest-agent agent.c

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define MAX_LINE 4096
#define MIB ((uint64_t)1 << 20)
// Largest size accepted by dirty/alloc: 1 TiB, far beyond any test guest,
// and small enough that MiB -> bytes can never overflow.
#define MAX_MIB ((uint64_t)1 << 20)
#define MAX_HELD 64
#define SH_TIMEOUT_MS (300 * 1000)
// Linux 5.14+; not in every libc's headers.
#define MADV_POPULATE_WRITE_ 23

static uint64_t seq;   // number of the command being answered
static int is_init;    // running as PID 1: never exit, power off instead

// ---------------------------------------------------------------------------
// Output

// Writes all of buf to stdout, retrying on EINTR and short writes.
static void write_all(const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(STDOUT_FILENO, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

// Prints one raw line (a newline is appended) with a single write(2).
static void raw_line(const char *fmt, ...) {
    char buf[MAX_LINE + 64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = (size_t)n;
    if (len > sizeof(buf) - 2)
        len = sizeof(buf) - 2;
    buf[len++] = '\n';
    write_all(buf, len);
}

// Prints one body line of the current answer.
static void out(const char *fmt, ...) {
    char text[MAX_LINE];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (n < 0)
        text[0] = '\0';
    raw_line("@@%" PRIu64 " %s", seq, text);
}

// Prints the body lines of a text buffer (which need not end in '\n').
static void out_text(const char *text, size_t len) {
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || text[i] == '\n') {
            if (i == len && i == start)
                break;
            size_t l = i - start;
            if (l > MAX_LINE - 1)
                l = MAX_LINE - 1;
            out("%.*s", (int)l, text + start);
            start = i + 1;
        }
    }
}

// Ends the answer; returns 0 so command handlers can `return ok();`.
static int ok(void) {
    raw_line("@@END %" PRIu64 " ok", seq);
    return 0;
}

static int error(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0)
        msg[0] = '\0';
    // Keep the END line on one line whatever the message holds.
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    raw_line("@@END %" PRIu64 " error %s", seq, msg);
    return -1;
}

// ---------------------------------------------------------------------------
// Helpers

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t ms_since(uint64_t start_ns) {
    return (now_ns() - start_ns) / 1000000u;
}

// Parses a decimal u64 with nothing else around it (but surrounding
// blanks). Returns 0 on success.
static int parse_u64(const char *s, uint64_t *val) {
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s < '0' || *s > '9')
        return -1;
    uint64_t v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        uint64_t d = (uint64_t)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s != '\0')
        return -1;
    *val = v;
    return 0;
}

// Reads a whole (small, e.g. procfs/sysfs) file into a malloc'd buffer.
static char *read_file(const char *path, size_t *len_out) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 16384, len = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        close(fd);
        return NULL;
    }
    for (;;) {
        if (len == cap) {
            if (cap > (SIZE_MAX - 1) / 2)
                break;
            char *nb = realloc(buf, cap * 2 + 1);
            if (!nb)
                break;
            buf = nb;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            free(buf);
            close(fd);
            return NULL;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    if (len_out)
        *len_out = len;
    return buf;
}

static int cmd_cat(const char *path) {
    size_t len;
    char *buf = read_file(path, &len);
    if (!buf)
        return error("cannot read %s: %s", path, strerror(errno));
    out_text(buf, len);
    free(buf);
    return ok();
}

// Reads exactly len bytes unless EOF; returns bytes read.
static size_t read_full(int fd, void *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return got;
}

static void describe_status(int status, char *buf, size_t len) {
    if (WIFEXITED(status))
        snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d%s", WTERMSIG(status),
                 WTERMSIG(status) == SIGKILL ? " (OOM killer?)" : "");
    else
        snprintf(buf, len, "status 0x%x", status);
}

// ---------------------------------------------------------------------------
// Memory: dirty / alloc / release

struct held {
    pid_t pid;
    uint64_t mib;
    int alive;
    int status;
};

static struct held held[MAX_HELD];
static size_t nheld;

// Records the death of a child reaped outside of its command.
static void note_reaped(pid_t pid, int status) {
    for (size_t i = 0; i < nheld; i++) {
        if (held[i].pid == pid && held[i].alive) {
            held[i].alive = 0;
            held[i].status = status;
        }
    }
}

// Reaps every finished child (orphans re-parented to PID 1 included).
static void reap_all(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return;
        note_reaped(pid, status);
    }
}

// Progress record sent by a memory child over a pipe (16 bytes, so
// every write is atomic).
struct progress {
    uint32_t kind;  // PROG_*
    uint32_t pad;
    uint64_t value;
};

enum {
    PROG_MIB = 1,     // value: MiB touched so far
    PROG_TOUCHED = 2, // value: ms taken to touch everything
    PROG_FREED = 3,   // value: ms taken by munmap
    PROG_MMAP_ERR = 4 // value: errno of mmap
};

static void send_progress(int fd, uint32_t kind, uint64_t value) {
    struct progress p = {kind, 0, value};
    ssize_t n;
    do {
        n = write(fd, &p, sizeof(p));
    } while (n < 0 && errno == EINTR);
}

// Child side: maps and touches mib MiB, page by page, with non-zero data.
// With hold, keeps it until killed; otherwise unmaps it and exits.
static void memory_child(int fd, uint64_t mib, int hold) {
    long page_l = sysconf(_SC_PAGESIZE);
    size_t page = page_l > 0 ? (size_t)page_l : 4096;
    size_t len = (size_t)(mib * MIB);
    if (hold) {
        // Prefer this child over everything else when memory runs out.
        int ofd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (ofd >= 0) {
            ssize_t w = write(ofd, "1000", 4);
            (void)w;
            close(ofd);
        }
    }
    uint64_t t0 = now_ns();
    // MAP_NORESERVE: do not let overcommit accounting refuse a large
    // request; we want to find out how much can really be touched.
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        send_progress(fd, PROG_MMAP_ERR, (uint64_t)errno);
        _exit(1);
    }
    size_t pages_per_mib = (size_t)MIB / page;
    int populate = 1;
    for (uint64_t m = 0; m < mib; m++) {
        unsigned char *base = p + m * MIB;
        // Faulting the MiB in with one call is several times faster in UML
        // than taking one page fault per page; the memset below writes
        // every page either way (and faults them in if madvise failed).
        if (populate && madvise(base, MIB, MADV_POPULATE_WRITE_) != 0 && errno == EINVAL)
            populate = 0;
        for (size_t i = 0; i < pages_per_mib; i++) {
            // Non-zero, page-dependent pattern over the whole page.
            unsigned char v = (unsigned char)(((m * pages_per_mib + i) % 255) + 1);
            memset(base + i * page, v, page);
        }
        send_progress(fd, PROG_MIB, m + 1);
    }
    send_progress(fd, PROG_TOUCHED, ms_since(t0));
    if (hold) {
        close(fd);
        for (;;)
            pause();
    }
    uint64_t t1 = now_ns();
    munmap(p, len);
    send_progress(fd, PROG_FREED, ms_since(t1));
    _exit(0);
}

// Creates a pipe (fds[0] to read, fds[1] to write) and forks. Returns the
// child's pid in the parent and 0 in the child. On failure returns -1 with
// both ends closed, after answering the command with an error.
static pid_t fork_with_pipe(int fds[2]) {
    if (pipe2(fds, O_CLOEXEC) != 0) {
        error("pipe: %s", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        error("fork: %s", strerror(e));
        return -1;
    }
    return pid;
}

// Runs memory_child in a forked child and reports. With hold, a child
// that touched everything is kept in `held`.
static int run_memory(const char *arg, int hold) {
    uint64_t mib;
    if (!arg || parse_u64(arg, &mib) != 0 || mib == 0 || mib > MAX_MIB)
        return error("usage: %s <MiB> (1..%" PRIu64 ")", hold ? "alloc" : "dirty",
                     MAX_MIB);
    if (hold && nheld >= MAX_HELD)
        return error("too many held allocations (%d); release first", MAX_HELD);
    int fds[2];
    uint64_t t0 = now_ns();
    pid_t pid = fork_with_pipe(fds);
    if (pid < 0)
        return -1;
    if (pid == 0) {
        close(fds[0]);
        memory_child(fds[1], mib, hold);
        _exit(0);
    }
    close(fds[1]);
    uint64_t got = 0, touch_ms = 0, free_ms = 0;
    int touched = 0, freed = 0, mmap_err = 0;
    struct progress p;
    while (read_full(fds[0], &p, sizeof(p)) == sizeof(p)) {
        switch (p.kind) {
        case PROG_MIB:
            got = p.value;
            break;
        case PROG_TOUCHED:
            touched = 1;
            touch_ms = p.value;
            break;
        case PROG_FREED:
            freed = 1;
            free_ms = p.value;
            break;
        case PROG_MMAP_ERR:
            mmap_err = (int)p.value;
            break;
        default:
            break;
        }
        // A holding child closes its end after PROG_TOUCHED.
        if (hold && touched)
            break;
    }
    close(fds[0]);
    out("requested_mib=%" PRIu64, mib);
    out("got_mib=%" PRIu64, got);
    if (touched)
        out("touch_ms=%" PRIu64, touch_ms);
    if (hold && touched) {
        held[nheld].pid = pid;
        held[nheld].mib = mib;
        held[nheld].alive = 1;
        held[nheld].status = 0;
        nheld++;
        out("pid=%d", (int)pid);
        out("ms=%" PRIu64, ms_since(t0));
        uint64_t total = 0;
        for (size_t i = 0; i < nheld; i++)
            if (held[i].alive)
                total += held[i].mib;
        out("held_mib=%" PRIu64, total);
        return ok();
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    uint64_t total_ms = ms_since(t0);
    if (freed)
        out("free_ms=%" PRIu64, free_ms);
    out("ms=%" PRIu64, total_ms);
    if (mmap_err)
        return error("mmap of %" PRIu64 " MiB failed: %s", mib, strerror(mmap_err));
    if (!hold && freed && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        if (total_ms > 0)
            out("mib_per_s=%" PRIu64, mib * 1000u / total_ms);
        return ok();
    }
    char desc[96];
    describe_status(status, desc, sizeof(desc));
    return error("child %s after %" PRIu64 " of %" PRIu64 " MiB", desc, got, mib);
}

// ---------------------------------------------------------------------------
// fill: page cache writes on a private tmpfs

struct fill {
    char dir[64];
    uint64_t mib;
};

static struct fill fills[MAX_HELD];
static size_t nfills;
static uint64_t fill_counter;

// Deletes a fill's file and its tmpfs. Returns 0 on success.
static int fill_remove(const char *dir) {
    char path[96];
    snprintf(path, sizeof(path), "%s/data", dir);
    int r = 0;
    if (unlink(path) != 0 && errno != ENOENT)
        r = -1;
    if (umount(dir) != 0)
        r = -1;
    rmdir(dir);
    return r;
}

static int cmd_fill(const char *arg) {
    char buf[64];
    uint64_t mib;
    int hold = 0;
    if (!arg || strlen(arg) >= sizeof(buf))
        return error("usage: fill <MiB> [hold] (1..%" PRIu64 ")", MAX_MIB);
    strcpy(buf, arg);
    char *opt = strchr(buf, ' ');
    if (opt) {
        *opt++ = '\0';
        while (*opt == ' ')
            opt++;
        if (strcmp(opt, "hold") != 0)
            return error("usage: fill <MiB> [hold]");
        hold = 1;
    }
    if (parse_u64(buf, &mib) != 0 || mib == 0 || mib > MAX_MIB)
        return error("usage: fill <MiB> [hold] (1..%" PRIu64 ")", MAX_MIB);
    if (hold && nfills >= MAX_HELD)
        return error("too many held fills (%d); release first", MAX_HELD);
    uint64_t t0 = now_ns();
    char dir[64];
    snprintf(dir, sizeof(dir), "/run/fill-%" PRIu64, ++fill_counter);
    mkdir("/run", 0755);
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return error("mkdir %s: %s", dir, strerror(errno));
    char opts[64];
    snprintf(opts, sizeof(opts), "size=%" PRIu64 "m,mode=0700", mib);
    if (mount("fill", dir, "tmpfs", 0, opts) != 0) {
        int e = errno;
        rmdir(dir);
        return error("mount tmpfs on %s: %s", dir, strerror(e));
    }
    char path[96];
    snprintf(path, sizeof(path), "%s/data", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        int e = errno;
        fill_remove(dir);
        return error("create %s: %s", path, strerror(e));
    }
    unsigned char *chunk = malloc(MIB);
    if (!chunk) {
        close(fd);
        fill_remove(dir);
        return error("out of memory for the write buffer");
    }
    long page_l = sysconf(_SC_PAGESIZE);
    size_t page = page_l > 0 ? (size_t)page_l : 4096;
    size_t pages_per_mib = (size_t)MIB / page;
    uint64_t got = 0;
    int werr = 0;
    for (uint64_t m = 0; m < mib && !werr; m++) {
        // Non-zero, page-dependent pattern, as dirty writes.
        for (size_t i = 0; i < pages_per_mib; i++)
            memset(chunk + i * page, (int)(((m * pages_per_mib + i) % 255) + 1), page);
        size_t done = 0;
        while (done < MIB) {
            ssize_t n = write(fd, chunk + done, MIB - done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                werr = n < 0 ? errno : ENOSPC;
                break;
            }
            done += (size_t)n;
        }
        if (!werr)
            got = m + 1;
    }
    free(chunk);
    close(fd);
    out("requested_mib=%" PRIu64, mib);
    out("got_mib=%" PRIu64, got);
    if (werr) {
        fill_remove(dir);
        out("ms=%" PRIu64, ms_since(t0));
        return error("write after %" PRIu64 " of %" PRIu64 " MiB: %s", got, mib,
                     strerror(werr));
    }
    if (hold) {
        snprintf(fills[nfills].dir, sizeof(fills[nfills].dir), "%s", dir);
        fills[nfills].mib = mib;
        nfills++;
        uint64_t total = 0;
        for (size_t i = 0; i < nfills; i++)
            total += fills[i].mib;
        out("held_fill_mib=%" PRIu64, total);
    } else if (fill_remove(dir) != 0) {
        return error("cannot delete %s: %s", path, strerror(errno));
    }
    uint64_t total_ms = ms_since(t0);
    out("ms=%" PRIu64, total_ms);
    if (total_ms > 0)
        out("mib_per_s=%" PRIu64, mib * 1000u / total_ms);
    return ok();
}

static int cmd_release(void) {
    uint64_t freed = 0;
    size_t count = 0;
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < nfills; i++) {
        if (fill_remove(fills[i].dir) == 0) {
            freed += fills[i].mib;
            count++;
        }
    }
    nfills = 0;
    for (size_t i = 0; i < nheld; i++) {
        if (!held[i].alive)
            continue;
        kill(held[i].pid, SIGKILL);
    }
    for (size_t i = 0; i < nheld; i++) {
        if (!held[i].alive)
            continue;
        int status;
        while (waitpid(held[i].pid, &status, 0) < 0 && errno == EINTR)
            ;
        held[i].alive = 0;
        freed += held[i].mib;
        count++;
    }
    nheld = 0;
    out("released=%zu", count);
    out("freed_mib=%" PRIu64, freed);
    out("ms=%" PRIu64, ms_since(t0));
    return ok();
}

static int cmd_held(void) {
    reap_all();
    uint64_t total = 0;
    for (size_t i = 0; i < nheld; i++) {
        char desc[96] = "alive";
        if (!held[i].alive)
            describe_status(held[i].status, desc, sizeof(desc));
        else
            total += held[i].mib;
        out("alloc pid=%d mib=%" PRIu64 " state=%s", (int)held[i].pid, held[i].mib,
            desc);
    }
    out("held_mib=%" PRIu64, total);
    return ok();
}

// ---------------------------------------------------------------------------
// features

struct feature_name {
    int bit;
    const char *name;
};

static const struct feature_name balloon_features[] = {
    {0, "MUST_TELL_HOST"}, {1, "STATS_VQ"},       {2, "DEFLATE_ON_OOM"},
    {3, "FREE_PAGE_HINT"}, {4, "PAGE_POISON"},    {5, "REPORTING"},
    {28, "INDIRECT_DESC"}, {29, "EVENT_IDX"},     {32, "VERSION_1"},
    {33, "ACCESS_PLATFORM"}, {34, "RING_PACKED"}, {35, "IN_ORDER"},
    {36, "ORDER_PLATFORM"}, {37, "SR_IOV"},       {38, "NOTIFICATION_DATA"},
    {39, "NOTIF_CONFIG_DATA"}, {40, "RING_RESET"},
};

static void trim(char *s) {
    size_t l = strlen(s);
    while (l > 0 && (s[l - 1] == '\n' || s[l - 1] == ' ' || s[l - 1] == '\r'))
        s[--l] = '\0';
}

static int cmd_features(void) {
    const char *base = "/sys/bus/virtio/devices";
    DIR *d = opendir(base);
    if (!d)
        return error("cannot open %s: %s", base, strerror(errno));
    int found = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof(path), "%s/%s/device", base, e->d_name);
        char *dev = read_file(path, NULL);
        if (!dev)
            continue;
        trim(dev);
        char *end;
        unsigned long id = strtoul(dev, &end, 0);
        int is_balloon = (*dev != '\0' && *end == '\0' && id == 5);
        free(dev);
        if (!is_balloon)
            continue;
        found++;
        out("device=%s", e->d_name);
        out("device_id=%lu", id);
        snprintf(path, sizeof(path), "%s/%s/status", base, e->d_name);
        char *st = read_file(path, NULL);
        if (st) {
            trim(st);
            out("status=%s", st);
            free(st);
        }
        snprintf(path, sizeof(path), "%s/%s/driver", base, e->d_name);
        char link[PATH_MAX];
        ssize_t ll = readlink(path, link, sizeof(link) - 1);
        if (ll > 0) {
            link[ll] = '\0';
            const char *slash = strrchr(link, '/');
            out("driver=%s", slash ? slash + 1 : link);
        } else {
            out("driver=");
        }
        snprintf(path, sizeof(path), "%s/%s/features", base, e->d_name);
        char *f = read_file(path, NULL);
        if (!f) {
            out("features=");
            continue;
        }
        trim(f);
        // sysfs prints one '0'/'1' character per bit, bit 0 first.
        out("features=%s", f);
        uint64_t mask = 0;
        char bits[512] = "", names[1024] = "";
        size_t bl = 0, nl = 0;
        for (size_t i = 0; f[i] && i < 128; i++) {
            if (f[i] != '1')
                continue;
            if (i < 64)
                mask |= (uint64_t)1 << i;
            int w = snprintf(bits + bl, sizeof(bits) - bl, "%s%zu", bl ? "," : "", i);
            if (w > 0 && (size_t)w < sizeof(bits) - bl)
                bl += (size_t)w;
            const char *name = NULL;
            for (size_t k = 0; k < sizeof(balloon_features) / sizeof(balloon_features[0]); k++)
                if ((size_t)balloon_features[k].bit == i)
                    name = balloon_features[k].name;
            char unknown[16];
            if (!name) {
                snprintf(unknown, sizeof(unknown), "BIT%zu", i);
                name = unknown;
            }
            w = snprintf(names + nl, sizeof(names) - nl, "%s%s", nl ? "," : "", name);
            if (w > 0 && (size_t)w < sizeof(names) - nl)
                nl += (size_t)w;
        }
        out("features_hex=0x%016" PRIx64, mask); // bits 0..63
        out("feature_bits=%s", bits);
        out("feature_names=%s", names);
        free(f);
    }
    closedir(d);
    if (!found)
        return error("no virtio balloon device (id 5) in %s", base);
    return ok();
}

// ---------------------------------------------------------------------------
// dmesg

static int cmd_dmesg(void) {
    int size = klogctl(10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0);
    if (size <= 0)
        size = 1 << 20;
    char *buf = malloc((size_t)size);
    if (!buf)
        return error("out of memory");
    int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, size);
    if (n < 0) {
        int e = errno;
        free(buf);
        return error("klogctl: %s", strerror(e));
    }
    out_text(buf, (size_t)n);
    free(buf);
    return ok();
}

// ---------------------------------------------------------------------------
// sh

static int cmd_sh(const char *arg) {
    if (!arg || !*arg)
        return error("usage: sh <command>");
    int fds[2];
    pid_t pid = fork_with_pipe(fds);
    if (pid < 0)
        return -1;
    if (pid == 0) {
        setpgid(0, 0);
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, STDIN_FILENO);
        dup2(fds[1], STDOUT_FILENO);
        dup2(fds[1], STDERR_FILENO);
        signal(SIGPIPE, SIG_DFL);
        execl("/bin/sh", "sh", "-c", arg, (char *)NULL);
        _exit(127);
    }
    setpgid(pid, pid);
    close(fds[1]);
    char buf[MAX_LINE];
    size_t have = 0;
    uint64_t t0 = now_ns();
    uint64_t exited_at = 0;
    int timed_out = 0, reaped = 0, status = 0;
    for (;;) {
        uint64_t elapsed = ms_since(t0);
        if (elapsed >= SH_TIMEOUT_MS) {
            timed_out = 1;
            break;
        }
        if (!reaped) {
            pid_t r = waitpid(pid, &status, WNOHANG);
            if (r == pid) {
                reaped = 1;
                exited_at = now_ns();
            }
        } else if (ms_since(exited_at) >= 500) {
            // The shell is gone but something it started in the
            // background still holds the pipe: stop reading.
            break;
        }
        struct pollfd pfd = {fds[0], POLLIN, 0};
        int r = poll(&pfd, 1, 100);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break;
        if (r == 0)
            continue;
        ssize_t n = read(fds[0], buf + have, sizeof(buf) - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        have += (size_t)n;
        // Emit complete lines; a line longer than the buffer is split.
        size_t start = 0;
        for (size_t i = 0; i < have; i++) {
            if (buf[i] == '\n') {
                out("%.*s", (int)(i - start), buf + start);
                start = i + 1;
            }
        }
        if (start == 0 && have == sizeof(buf) - 1) {
            out("%.*s", (int)have, buf);
            start = have;
        }
        memmove(buf, buf + start, have - start);
        have -= start;
    }
    if (have > 0)
        out("%.*s", (int)have, buf);
    close(fds[0]);
    if (timed_out)
        kill(-pid, SIGKILL);
    while (!reaped) {
        if (waitpid(pid, &status, 0) == pid || errno != EINTR)
            reaped = 1;
    }
    if (timed_out)
        return error("timed out after %d s", SH_TIMEOUT_MS / 1000);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return ok();
    char desc[96];
    describe_status(status, desc, sizeof(desc));
    return error("command %s", desc);
}

// ---------------------------------------------------------------------------
// poweroff

static void power_off(void) {
    sync();
    if (is_init) {
        reboot(RB_POWER_OFF);
        // Should not return; if it does, stay alive (PID 1 must not exit).
        for (;;)
            pause();
    }
    // Not PID 1 (e.g. a developer runs the agent on a host): just exit.
    exit(0);
}

// ---------------------------------------------------------------------------
// Main loop

static int cmd_help(void) {
    static const char *lines[] = {
        "meminfo            /proc/meminfo",
        "buddyinfo          /proc/buddyinfo",
        "vmstat             /proc/vmstat",
        "zoneinfo           /proc/zoneinfo",
        "dmesg              kernel log buffer",
        "features           negotiated features of the virtio balloon device(s)",
        "dirty <MiB>        map, write every page, unmap; report timings",
        "alloc <MiB>        map and write every page, keep it (in a child)",
        "fill <MiB> [hold]  write data into a tmpfs file with write(2); delete it",
        "                   (or keep it until release, with hold)",
        "held               list held allocations",
        "release            free every held allocation and fill",
        "sh <command>       run a command with /bin/sh -c",
        "echo <text>        print text",
        "poweroff           sync and power the guest off",
    };
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++)
        out("%s", lines[i]);
    return ok();
}

static void dispatch(char *line) {
    char *cmd = line;
    char *arg = strchr(line, ' ');
    if (arg) {
        *arg++ = '\0';
        while (*arg == ' ')
            arg++;
    }
    int no_arg = (arg == NULL || *arg == '\0');
    if (!strcmp(cmd, "echo")) {
        out("%s", arg ? arg : "");
        ok();
        return;
    }
    if (!strcmp(cmd, "sh")) {
        cmd_sh(arg);
        return;
    }
    if (!strcmp(cmd, "dirty")) {
        run_memory(arg, 0);
        return;
    }
    if (!strcmp(cmd, "alloc")) {
        run_memory(arg, 1);
        return;
    }
    if (!strcmp(cmd, "fill")) {
        cmd_fill(arg);
        return;
    }
    if (!no_arg) {
        error("command %s takes no argument", cmd);
        return;
    }
    if (!strcmp(cmd, "meminfo"))
        cmd_cat("/proc/meminfo");
    else if (!strcmp(cmd, "buddyinfo"))
        cmd_cat("/proc/buddyinfo");
    else if (!strcmp(cmd, "vmstat"))
        cmd_cat("/proc/vmstat");
    else if (!strcmp(cmd, "zoneinfo"))
        cmd_cat("/proc/zoneinfo");
    else if (!strcmp(cmd, "dmesg"))
        cmd_dmesg();
    else if (!strcmp(cmd, "features"))
        cmd_features();
    else if (!strcmp(cmd, "held"))
        cmd_held();
    else if (!strcmp(cmd, "release"))
        cmd_release();
    else if (!strcmp(cmd, "help"))
        cmd_help();
    else if (!strcmp(cmd, "poweroff")) {
        ok();
        power_off();
    } else
        error("unknown command: %s", cmd);
}

// Turns off echo and output post-processing on the console so that the
// host sees exactly what the agent writes.
static void setup_console(void) {
    struct termios t;
    if (tcgetattr(STDIN_FILENO, &t) != 0)
        return;
    t.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL | ECHOCTL | ECHOKE);
    t.c_lflag |= ICANON;
    t.c_iflag &= ~(tcflag_t)(ICRNL | INLCR | IGNCR | IXON);
    t.c_oflag &= ~(tcflag_t)OPOST;
    tcsetattr(STDIN_FILENO, TCSANOW, &t);
}

int main(void) {
    is_init = (getpid() == 1);
    signal(SIGPIPE, SIG_IGN);
    setup_console();
    static char line[MAX_LINE + 2];
    raw_line("@@READY %d", PROTOCOL_VERSION);
    for (;;) {
        reap_all();
        if (!fgets(line, sizeof(line), stdin)) {
            if (ferror(stdin) && errno == EINTR) {
                clearerr(stdin);
                continue;
            }
            // The host closed the console: nothing more to do.
            raw_line("@@EOF");
            power_off();
        }
        size_t len = strlen(line);
        int complete = (len > 0 && line[len - 1] == '\n');
        if (!complete && len == sizeof(line) - 1) {
            // Overlong line: drop the rest of it and refuse it.
            int c;
            while ((c = fgetc(stdin)) != EOF && c != '\n')
                ;
            seq++;
            raw_line("@@BEGIN %" PRIu64 " (overlong line)", seq);
            error("line longer than %d bytes", MAX_LINE);
            continue;
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r' ||
                           line[len - 1] == ' ' || line[len - 1] == '\t'))
            line[--len] = '\0';
        char *start = line;
        while (*start == ' ' || *start == '\t')
            start++;
        if (*start == '\0')
            continue;
        // Replace control characters so that they cannot break framing.
        for (char *p = start; *p; p++)
            if ((unsigned char)*p < 0x20)
                *p = ' ';
        seq++;
        raw_line("@@BEGIN %" PRIu64 " %s", seq, start);
        dispatch(start);
    }
}
