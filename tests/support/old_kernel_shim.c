/*
 * old_kernel_shim.c: makes this kernel look like one before Linux 6.10 to ackgate, for
 * tests/lifecycle.rs. Loaded with LD_PRELOAD, it fails setsockopt(SOL_SOCKET, SO_PEEK_OFF) on
 * TCP sockets with EOPNOTSUPP, as those kernels do (their TCP has no peek offset); every other
 * call goes to the real setsockopt (dlsym(RTLD_NEXT, ...)).
 *
 * Build: cc -shared -fPIC -O2 -o libold_kernel_shim.so old_kernel_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>

#ifndef SO_PEEK_OFF
#define SO_PEEK_OFF 42
#endif

typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);

int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
    static setsockopt_fn real;
    if (!real) {
        real = (setsockopt_fn)dlsym(RTLD_NEXT, "setsockopt");
    }
    if (level == SOL_SOCKET && name == SO_PEEK_OFF) {
        int type = 0;
        socklen_t type_len = sizeof(type);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) == 0 && type == SOCK_STREAM) {
            errno = EOPNOTSUPP;
            return -1;
        }
    }
    return real(fd, level, name, value, len);
}
