/*
 * eio_shim.c: a real-errno disk fault injector for the fault tests (tests/faults_io.rs).
 *
 * Loaded into `ackgate run` with LD_PRELOAD, it interposes the calls redb makes on its file
 * (std's read_exact_at / write_all_at / sync_data end in pread64 / pwrite64 / fdatasync) and,
 * while the test says so, fails them with errno = EIO and -1, as a dying disk does. The real
 * function is reached through dlsym(RTLD_NEXT, ...) otherwise.
 *
 * Which descriptors: only those whose path (readlink of /proc/self/fd/N) ends with the suffix
 * in env ACKGATE_FAULT_PATH (e.g. "spool.redb"). The readlink happens only while a fault mode
 * is on; with the mode off, a call costs one load from the mapped control file.
 *
 * Control file: its path is in env ACKGATE_FAULT_CTL. The test creates it (CTL_SIZE bytes,
 * magic set) before it starts ackgate; the constructor below maps it MAP_SHARED, so the test
 * switches faults at any instant with a plain pwrite into the file and reads the counters
 * back with a pread (Linux keeps a shared file mapping coherent with read/write). Without
 * both variables, or with a file that is too short or lacks the magic, the shim passes every
 * call through.
 *
 * Layout (host byte order; tests/support/eio.rs mirrors it):
 *   offset  0  u32  magic            CTL_MAGIC, written by the test
 *   offset  4  u32  mode             bit 0 fail reads  (pread, pread64, preadv)
 *                                    bit 1 fail writes (pwrite, pwrite64, pwritev)
 *                                    bit 2 fail syncs  (fdatasync, fsync)
 *                                    bit 3 kill after a commit: the next fdatasync/fsync
 *                                          that succeeds after a write at offset 0 (redb
 *                                          writes its header only to commit; a sync without
 *                                          one is the file growing) clears this bit, then
 *                                          SIGKILLs its process (one process, once: a commit
 *                                          is durable, and nothing after it ran)
 *   offset  8  u64  read_failures    calls this shim failed, per kind (atomic adds)
 *   offset 16  u64  write_failures
 *   offset 24  u64  sync_failures
 *   offset 32  u64  attached         processes whose constructor mapped the file
 *
 * Build: cc -shared -fPIC -O2 -o libeio_shim.so eio_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define CTL_MAGIC 0x49464741u /* "AGFI" in little-endian byte order */
#define CTL_SIZE 4096

#define FAIL_READS 1u
#define FAIL_WRITES 2u
#define FAIL_SYNCS 4u
#define KILL_AFTER_SYNC 8u

struct ctl {
    uint32_t magic;
    uint32_t mode;
    uint64_t read_failures;
    uint64_t write_failures;
    uint64_t sync_failures;
    uint64_t attached;
};

static struct ctl *ctl;
static char suffix[256];
static size_t suffix_len;

__attribute__((constructor)) static void eio_shim_init(void)
{
    const char *path = getenv("ACKGATE_FAULT_CTL");
    const char *target = getenv("ACKGATE_FAULT_PATH");
    if (!path || !target || !*target || strlen(target) >= sizeof suffix)
        return;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return;
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < CTL_SIZE) {
        close(fd);
        return;
    }
    void *map = mmap(NULL, CTL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return;
    struct ctl *c = map;
    if (__atomic_load_n(&c->magic, __ATOMIC_ACQUIRE) != CTL_MAGIC) {
        munmap(map, CTL_SIZE);
        return;
    }
    memcpy(suffix, target, strlen(target) + 1);
    suffix_len = strlen(suffix);
    __atomic_fetch_add(&c->attached, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&ctl, c, __ATOMIC_RELEASE);
}

/* Whether fd's path ends with the suffix. Leaves errno as it was. */
static int targeted(int fd)
{
    int saved = errno;
    char link[64];
    char path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path);
    errno = saved;
    return n > 0 && (size_t)n >= suffix_len &&
           memcmp(path + n - suffix_len, suffix, suffix_len) == 0;
}

/* Whether this call must fail; counts it if so. The fast path is one load of `mode`. */
static int inject(unsigned bit, int fd, uint64_t *counter_of(struct ctl *))
{
    struct ctl *c = __atomic_load_n(&ctl, __ATOMIC_ACQUIRE);
    if (!c || !(__atomic_load_n(&c->mode, __ATOMIC_RELAXED) & bit) || !targeted(fd))
        return 0;
    __atomic_fetch_add(counter_of(c), 1, __ATOMIC_RELAXED);
    errno = EIO;
    return 1;
}

static uint64_t *reads(struct ctl *c) { return &c->read_failures; }
static uint64_t *writes(struct ctl *c) { return &c->write_failures; }
static uint64_t *syncs(struct ctl *c) { return &c->sync_failures; }

/* The next definition of `name` (libc's), looked up once. */
#define REAL(name)                                                                 \
    static __typeof__(&name) real_##name;                                          \
    if (!real_##name)                                                              \
        real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name);                  \
    if (!real_##name) {                                                            \
        errno = ENOSYS;                                                            \
        return -1;                                                                 \
    }

/* An interposed call: fails with EIO while the mode has `bit` and the descriptor is targeted,
 * and is counted then; otherwise it goes on to libc's `name`. */
#define INTERPOSE(ret, name, bit, counter, params, args)                           \
    ret name params                                                                \
    {                                                                              \
        REAL(name);                                                                \
        if (inject(bit, fd, counter))                                              \
            return -1;                                                             \
        return real_##name args;                                                   \
    }

/* clang-format off */
INTERPOSE(ssize_t, pread64, FAIL_READS, reads,
          (int fd, void *buf, size_t count, off64_t offset), (fd, buf, count, offset))
INTERPOSE(ssize_t, pread, FAIL_READS, reads,
          (int fd, void *buf, size_t count, off_t offset), (fd, buf, count, offset))
INTERPOSE(ssize_t, preadv, FAIL_READS, reads,
          (int fd, const struct iovec *iov, int iovcnt, off_t offset), (fd, iov, iovcnt, offset))
/* clang-format on */

/* Whether a commit must kill (the mode has KILL_AFTER_SYNC) and fd is the targeted file. */
static int kill_armed(int fd)
{
    struct ctl *c = __atomic_load_n(&ctl, __ATOMIC_ACQUIRE);
    return c && (__atomic_load_n(&c->mode, __ATOMIC_RELAXED) & KILL_AFTER_SYNC) && targeted(fd);
}

/* A header write (offset 0) since the last sync of the targeted file, while armed. */
static int header_written;

static void note_write(int fd, off64_t offset)
{
    if (offset == 0 && kill_armed(fd))
        __atomic_store_n(&header_written, 1, __ATOMIC_RELEASE);
}

/* A write interposed as INTERPOSE does, that also notes a header write for KILL_AFTER_SYNC. */
#define INTERPOSE_WRITE(name, params, args)                                        \
    ssize_t name params                                                            \
    {                                                                              \
        REAL(name);                                                                \
        if (inject(FAIL_WRITES, fd, writes))                                       \
            return -1;                                                             \
        note_write(fd, offset);                                                    \
        return real_##name args;                                                   \
    }

/* clang-format off */
INTERPOSE_WRITE(pwrite64, (int fd, const void *buf, size_t count, off64_t offset), (fd, buf, count, offset))
INTERPOSE_WRITE(pwrite, (int fd, const void *buf, size_t count, off_t offset), (fd, buf, count, offset))
INTERPOSE_WRITE(pwritev, (int fd, const struct iovec *iov, int iovcnt, off_t offset), (fd, iov, iovcnt, offset))
/* clang-format on */

/* After a sync that succeeded: a commit (its header was written since the last sync) kills
 * if the test asked for it; the first such sync of any attached process takes the bit, so
 * exactly one dies. */
static int kill_if_asked(int fd, int result)
{
    if (result != 0 || !kill_armed(fd))
        return result;
    if (!__atomic_exchange_n(&header_written, 0, __ATOMIC_ACQ_REL))
        return result;
    struct ctl *c = __atomic_load_n(&ctl, __ATOMIC_ACQUIRE);
    if (__atomic_fetch_and(&c->mode, ~KILL_AFTER_SYNC, __ATOMIC_ACQ_REL) & KILL_AFTER_SYNC)
        raise(SIGKILL);
    return result;
}

/* A sync interposed as INTERPOSE does, then killed after if KILL_AFTER_SYNC asks. */
#define INTERPOSE_SYNC(name)                                                       \
    int name(int fd)                                                               \
    {                                                                              \
        REAL(name);                                                                \
        if (inject(FAIL_SYNCS, fd, syncs))                                         \
            return -1;                                                             \
        return kill_if_asked(fd, real_##name(fd));                                 \
    }

INTERPOSE_SYNC(fdatasync)
INTERPOSE_SYNC(fsync)
