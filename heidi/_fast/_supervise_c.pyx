# cython: language_level=3, boundscheck=False, wraparound=False, annotation_typing=False
# distutils: libraries = dl
"""Stage supervision, compiled twin of `_supervise_py` (same API, same `_supervise_core.Stage`).

Spawning is posix_spawn called from C with the argv and environment laid out in one block and
the GIL released (the vfork'd child runs until exec); the wait loop polls and reads in C with the
GIL released, so a daemon's HTTP thread runs freely while a stage trains for hours; each chunk is
read straight into a bytes object sized by FIONREAD.
"""
import os

from . import _supervise_core as _core
from . import _supervise_watchdog as _wd
from ._supervise_types import StageResult

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EINTR, errno
from libc.math cimport INFINITY, ceil
from libc.string cimport memcpy
from posix.unistd cimport read as c_read

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <signal.h>
    #include <spawn.h>
    #include <dirent.h>
    #include <dlfcn.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <sys/resource.h>
    #include <sys/wait.h>
    #include <unistd.h>

    #ifndef RTLD_DEFAULT
    #define RTLD_DEFAULT ((void *)0)
    #endif

    /* The file actions newer than the oldest glibc heidi runs on (2.29 for chdir, 2.34 for
       closefrom) are looked up when the module loads, not linked: the same .so then needs no
       newer glibc than the one it meets, and uses them wherever that glibc has them. */
    typedef int (*heidi_addclosefrom_fn)(posix_spawn_file_actions_t *, int);
    typedef int (*heidi_addchdir_fn)(posix_spawn_file_actions_t *, const char *);
    static heidi_addclosefrom_fn heidi_addclosefrom = NULL;
    static heidi_addchdir_fn heidi_addchdir = NULL;

    static void heidi_resolve_spawn(int closefrom, int chdir) {
        heidi_addclosefrom = closefrom ? (heidi_addclosefrom_fn)dlsym(
            RTLD_DEFAULT, "posix_spawn_file_actions_addclosefrom_np") : NULL;
        heidi_addchdir = chdir ? (heidi_addchdir_fn)dlsym(
            RTLD_DEFAULT, "posix_spawn_file_actions_addchdir_np") : NULL;
    }

    /* Without closefrom: close, in the child, every fd above 2 that is not close-on-exec. */
    static int heidi_add_closes(posix_spawn_file_actions_t *fa, int keep) {
        DIR *dir = opendir("/proc/self/fd");
        struct dirent *entry;
        if (dir == NULL)
            return 0;
        while ((entry = readdir(dir)) != NULL) {
            int fd = atoi(entry->d_name), flags;
            if (fd <= 2 || fd == dirfd(dir) || fd == keep)
                continue;
            flags = fcntl(fd, F_GETFD);
            if (flags >= 0 && !(flags & FD_CLOEXEC))
                posix_spawn_file_actions_addclose(fa, fd);
        }
        closedir(dir);
        return 0;
    }

    /* 1 if the children of `me`'s main thread are at most `allowed` (the watchdog), 0 if there is
       another, -1 if that cannot be told here (no such file, or too many to look at). */
    static int heidi_no_other_child(pid_t me, pid_t allowed) {
        char path[64], buf[4096];
        ssize_t n, i;
        long pid = 0;
        int fd, digits = 0;
        snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)me, (int)me);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -1;
        do {
            n = read(fd, buf, sizeof buf);
        } while (n < 0 && errno == EINTR);
        close(fd);
        if (n < 0 || n == (ssize_t)sizeof buf)
            return -1;
        for (i = 0; i <= n; i++) {
            if (i < n && buf[i] >= '0' && buf[i] <= '9') {
                pid = pid * 10 + (buf[i] - '0');
                digits = 1;
            } else if (digits) {
                if (pid != (long)allowed)
                    return 0;
                pid = 0;
                digits = 0;
            }
        }
        return 1;
    }

    /* The stage: its own session (and so process group), signals at their defaults and none
       blocked, stdin /dev/null, stdout and stderr the output pipe, no other fd, cwd if given.
       Returns 0 or an errno value. */
    static int heidi_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                           const char *cwd, int out_fd) {
        posix_spawnattr_t attr;
        posix_spawn_file_actions_t actions;
        sigset_t none, all;
        int rc;
        if (cwd != NULL && heidi_addchdir == NULL)
            return ENOSYS;  /* the caller forks and execs instead */
        sigemptyset(&none);
        sigfillset(&all);  /* the C library leaves out its own internal signals */
        if ((rc = posix_spawnattr_init(&attr)) != 0)
            return rc;
        if ((rc = posix_spawn_file_actions_init(&actions)) != 0) {
            posix_spawnattr_destroy(&attr);
            return rc;
        }
        rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK
                                             | POSIX_SPAWN_SETSIGDEF);
        if (rc == 0) rc = posix_spawnattr_setsigmask(&attr, &none);
        if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);
        if (rc == 0) rc = posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
        if (rc == 0) rc = posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
        if (rc == 0) rc = posix_spawn_file_actions_adddup2(&actions, out_fd, 2);
        if (rc == 0 && cwd != NULL) rc = heidi_addchdir(&actions, cwd);
        if (rc == 0) rc = heidi_addclosefrom != NULL ? heidi_addclosefrom(&actions, 3)
                                                    : heidi_add_closes(&actions, out_fd);
        if (rc == 0) rc = posix_spawn(pid, path, &actions, &attr, argv, envp);
        posix_spawn_file_actions_destroy(&actions);
        posix_spawnattr_destroy(&attr);
        return rc;
    }
    """
    int heidi_spawn(int *pid, const char *path, char **argv, char **envp, const char *cwd,
                    int out_fd) nogil
    int heidi_no_other_child(int me, int allowed) nogil
    void heidi_resolve_spawn(int closefrom, int chdir)
    void *heidi_addclosefrom
    void *heidi_addchdir
    struct timeval:
        long tv_sec
        long tv_usec
    struct rusage:
        timeval ru_utime
        timeval ru_stime
        long ru_maxrss
    int wait4(int pid, int *status, int options, rusage *ru) nogil
    const int WNOHANG

cdef extern from *:
    """
    #include <string.h>
    #include <sys/syscall.h>

    /* In a vfork child (memory shared with heidi: no malloc, no stdio): close every fd above 2. */
    static void heidi_close_above2(void) {
        char buf[2048] __attribute__((aligned(8)));
        long n, off;
        int dir;
    #ifdef SYS_close_range
        if (syscall(SYS_close_range, 3U, ~0U, 0U) == 0)
            return;
    #endif
        dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir < 0)
            return;
        while ((n = syscall(SYS_getdents64, dir, buf, sizeof buf)) > 0) {
            for (off = 0; off < n;) {
                unsigned short reclen = *(unsigned short *)(buf + off + 16);
                const char *name = buf + off + 19;
                int fd = 0;
                for (; *name >= '0' && *name <= '9'; name++)
                    fd = fd * 10 + (*name - '0');
                if (*name == 0 && name != buf + off + 19 && fd > 2 && fd != dir)
                    close(fd);
                off += reclen;
            }
        }
        close(dir);
    }

    /* heidi_spawn's stage, started in a cgroup: the child writes itself into the cgroup
       (procs_fd, its cgroup.procs) before anything else, so nothing the stage runs is ever
       outside it; then the same session, signals, fds and cwd as heidi_spawn. vfork, like
       posix_spawn: the child borrows heidi's memory until exec. Returns 0 or an errno value;
       *failed_step says which step failed (1 cgroup, 2 chdir, 3 other). */
    static int heidi_spawn_cg(pid_t *pid_out, const char *path, char *const argv[],
                              char *const envp[], const char *cwd, int out_fd, int procs_fd,
                              int *failed_step) {
        sigset_t all, old, none;
        volatile int child_err = 0, child_step = 0;
        pid_t pid;
        sigfillset(&all);
        sigemptyset(&none);
        /* Blocked until the child has reset them: heidi's handlers must never run in it. */
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pid = vfork();
        if (pid == 0) {
            struct sigaction dfl;
            int sig, fd, null_fd;
            memset(&dfl, 0, sizeof dfl);
            dfl.sa_handler = SIG_DFL;
            for (sig = 1; sig < NSIG; sig++)
                sigaction(sig, &dfl, NULL);
            if (write(procs_fd, "0", 1) != 1) {
                child_step = 1;
                goto fail;
            }
            child_step = 3;
            if (setsid() < 0)
                goto fail;
            fd = out_fd;
            if (fd < 3 && (fd = fcntl(out_fd, F_DUPFD, 3)) < 0)
                goto fail;
            null_fd = open("/dev/null", O_RDONLY);
            if (null_fd < 0 || (null_fd != 0 && dup2(null_fd, 0) < 0))
                goto fail;
            if (dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
                goto fail;
            if (cwd != NULL && chdir(cwd) < 0) {
                child_step = 2;
                goto fail;
            }
            heidi_close_above2();
            sigprocmask(SIG_SETMASK, &none, NULL);
            execve(path, argv, envp);
        fail:
            child_err = errno ? errno : EINVAL;
            _exit(127);
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (pid < 0)
            return errno;
        if (child_err != 0) {
            int status;
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            *failed_step = child_step;
            return child_err;
        }
        *pid_out = pid;
        return 0;
    }
    """
    int heidi_spawn_cg(int *pid, const char *path, char **argv, char **envp, const char *cwd,
                       int out_fd, int procs_fd, int *failed_step) nogil

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    const short POLLIN

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clock_id, timespec *ts)
    const int CLOCK_MONOTONIC

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, int *arg)
    const unsigned long FIONREAD

__all__ = ("StageResult", "run_supervised", "COMPILED")
# Imports made here are invisible to PyInstaller's analysis of the .so: list them.
HIDDEN_IMPORTS = ("heidi._fast._supervise_core", "heidi._fast._supervise_watchdog",
                  "heidi._fast._supervise_types", "os")

COMPILED = True
heidi_resolve_spawn(1, 1)


def _spawn_features():
    """Which newer posix_spawn file actions the running C library has (else: the fallbacks)."""
    return {"closefrom": heidi_addclosefrom != NULL, "chdir": heidi_addchdir != NULL}


def _use_spawn_features(bint closefrom, bint chdir):
    """Tests: act as on a C library without them (False), or look them up again (True)."""
    heidi_resolve_spawn(closefrom, chdir)
    return _spawn_features()
# Largest chunk handed to on_output (the output pipe holds 1 MiB).
cdef Py_ssize_t READ_MAX = 1 << 20
# Read size when FIONREAD has nothing to say (end of file, or a racing writer).
cdef Py_ssize_t READ_DEFAULT = 1 << 16
# Longest single poll(): the loop looks at pending signals at least this often.
cdef double MAX_WAIT_MS = 1000.0


cdef inline double _now() noexcept nogil:
    # CLOCK_MONOTONIC: the clock time.monotonic() reads, which the stage's times come from.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef char **_string_array(list items) except NULL:
    """NULL-terminated char* array over the bytes in items (pointing into them)."""
    cdef Py_ssize_t n = len(items), i
    cdef char **out = <char **>PyMem_Malloc((n + 1) * sizeof(char *))
    if out == NULL:
        raise MemoryError()
    for i in range(n):
        out[i] = PyBytes_AS_STRING(<bytes>items[i])
    out[n] = NULL
    return out


cdef char **_env_block(dict env) except NULL:
    """One allocation: the NULL-terminated array, then every "KEY=VALUE\\0" string."""
    cdef Py_ssize_t n = len(env), size = (n + 1) * sizeof(char *), i = 0, lk, lv
    cdef bytes key, value
    for key, value in env.items():
        size += PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(value) + 2
    cdef char **out = <char **>PyMem_Malloc(size)
    if out == NULL:
        raise MemoryError()
    cdef char *p = <char *>(out + n + 1)
    for key, value in env.items():
        lk = PyBytes_GET_SIZE(key)
        lv = PyBytes_GET_SIZE(value)
        out[i] = p
        memcpy(p, PyBytes_AS_STRING(key), lk)
        p[lk] = b'='
        memcpy(p + lk + 1, PyBytes_AS_STRING(value), lv)
        p[lk + 1 + lv] = 0
        p += lk + lv + 2
        i += 1
    out[n] = NULL
    return out


def _spawn(bytes path, list argv, dict env, cwd, int out_w):
    """posix_spawn the stage (see heidi_spawn); returns its pid or raises OSError."""
    cdef char **c_argv = _string_array(argv)
    cdef char **c_env
    try:
        c_env = _env_block(env)
    except BaseException:
        PyMem_Free(c_argv)
        raise
    cdef bytes cwd_b = cwd
    cdef const char *c_cwd = NULL if cwd_b is None else PyBytes_AS_STRING(cwd_b)
    cdef const char *c_path = PyBytes_AS_STRING(path)
    cdef int pid = 0, rc
    with nogil:
        rc = heidi_spawn(&pid, c_path, c_argv, c_env, c_cwd, out_w)
    PyMem_Free(c_env)
    PyMem_Free(c_argv)
    if rc != 0:
        raise OSError(rc, os.strerror(rc))
    return pid


def _spawn_cg(bytes path, list argv, dict env, cwd, int out_w, int procs_fd):
    """heidi_spawn_cg: the stage enters its cgroup before it execs; its pid, or OSError (with
    filename "cgroup.procs" when entering the cgroup failed, the cwd when the chdir did)."""
    cdef char **c_argv = _string_array(argv)
    cdef char **c_env
    try:
        c_env = _env_block(env)
    except BaseException:
        PyMem_Free(c_argv)
        raise
    cdef bytes cwd_b = cwd
    cdef const char *c_cwd = NULL if cwd_b is None else PyBytes_AS_STRING(cwd_b)
    cdef const char *c_path = PyBytes_AS_STRING(path)
    cdef int pid = 0, rc, step = 0
    with nogil:
        rc = heidi_spawn_cg(&pid, c_path, c_argv, c_env, c_cwd, out_w, procs_fd, &step)
    PyMem_Free(c_env)
    PyMem_Free(c_argv)
    if rc != 0:
        if step == 1:
            raise OSError(rc, os.strerror(rc), _core.CGROUP_PROCS)
        if step == 2:
            raise OSError(rc, os.strerror(rc), os.fsdecode(cwd_b))
        raise OSError(rc, os.strerror(rc))
    return pid


cdef object _read_chunk(int fd):
    """One read(); b"" at end of file."""
    cdef int avail = 0
    cdef Py_ssize_t want, n
    with nogil:
        if ioctl(fd, FIONREAD, &avail) < 0 or avail <= 0:
            want = READ_DEFAULT
        else:
            want = avail if avail < READ_MAX else READ_MAX
    buf = PyBytes_FromStringAndSize(NULL, want)
    cdef char *p = PyBytes_AS_STRING(buf)
    while True:
        # The bytes object is ours alone until returned: filling it without the GIL is safe.
        with nogil:
            n = c_read(fd, p, want)
        if n >= 0:
            break
        if errno != EINTR:
            PyErr_SetFromErrno(OSError)
        PyErr_CheckSignals()
    if n == want:
        return buf
    return buf[:n]


def run_supervised(argv, *, cwd=None, env=None, timeout_s=None, grace_s=5.0, on_output=None,
                   should_stop=None, check_interval_s=0.25, rlimits=None):
    """Run argv as a stage and wait for it; see `heidi._fast.supervise` for the contract."""
    _core.check_args(timeout_s, grace_s, check_interval_s)
    stage = _core.Stage(argv, cwd, env, rlimits, grace_s)
    stage.start(_spawn, _spawn_cg)
    if stage.error is not None:
        return stage.result(False, timeout_s, False, 0)
    cdef int out_fd = stage.out_fd
    cdef pollfd fds[2]
    cdef int rc, timeout_ms
    cdef double now, wake
    cdef double t0 = stage.t0
    cdef double deadline = t0 + timeout_s if timeout_s is not None else INFINITY
    cdef double interval = check_interval_s
    cdef double next_check = t0 + interval if should_stop is not None else INFINITY
    cdef double drain_until = INFINITY
    cdef double drain_s = _core.DRAIN_S
    cdef bint out_open = True, grown = False, pid_ready, eof
    cdef Py_ssize_t pipe_full = _core.PIPE_DEFAULT_SIZE
    cdef bint timed_out = False, stopped = False
    cdef long long total = 0
    cdef Py_ssize_t size
    cdef int pid = stage.pid, me = stage.me, status = 0, clear, allowed
    cdef rusage ru
    fds[0].fd = out_fd
    fds[0].events = POLLIN
    fds[1].events = POLLIN
    try:
        while True:
            now = _now()
            if stage.finished:
                # Nothing of the stage is left: read what is still in the pipe, bounded in case
                # a writer escaped.
                if not out_open:
                    break
                if drain_until == INFINITY:
                    drain_until = now + drain_s
                elif now >= drain_until:
                    break
                wake = drain_until
            else:
                wake = stage.wake_at
                if stage.live:
                    if deadline < wake:
                        wake = deadline
                    if next_check < wake:
                        wake = next_check
            # Capped: a signal (^C) that lands between the check below and poll() would otherwise
            # wait for the next event; Cython code has no bytecode boundary to notice it at.
            if wake <= now:
                timeout_ms = 0
            else:
                timeout_ms = <int>min(ceil((wake - now) * 1000.0), MAX_WAIT_MS)
            PyErr_CheckSignals()
            fds[0].fd = out_fd if out_open else -1
            fds[1].fd = stage.pidfd
            fds[0].revents = 0
            fds[1].revents = 0
            with nogil:
                rc = poll(fds, 2, timeout_ms)
            if rc < 0:
                if errno != EINTR:
                    PyErr_SetFromErrno(OSError)
                PyErr_CheckSignals()  # ^C while waiting: KeyboardInterrupt, handled below
                continue
            pid_ready = fds[1].revents != 0
            eof = False
            if fds[0].revents & POLLIN:
                data = _read_chunk(out_fd)
                size = len(data)
                if size:
                    total += size
                    if not grown and size >= pipe_full:
                        _core.grow_pipe(out_fd)
                        grown = True
                    if on_output is not None:
                        on_output(data)
                else:
                    eof = True
            elif fds[0].revents:
                eof = True  # POLLHUP alone: every writer is gone and nothing is left to read
            if eof:
                stage.close_output()
                out_open = False
            if stage.finished:
                continue
            now = _now()
            if (pid_ready or eof) and stage.live and stage.subreaper:
                # The common end, kept short: the main process exited by itself (its output
                # ended with it) and, as this process's children show, left nothing behind.
                with nogil:
                    rc = wait4(pid, &status, WNOHANG, &ru)
                if rc == pid:
                    watchdog = _wd.current_watchdog()
                    allowed = watchdog if watchdog is not None else -1
                    with nogil:
                        clear = heidi_no_other_child(me, allowed)
                    stage.reaped_by_loop(status, ru.ru_maxrss,
                                         ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6,
                                         ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6,
                                         clear == 1, now)
                    continue
            if pid_ready or eof or now >= stage.wake_at:
                stage.on_wake(now)
            if not stage.live:
                continue
            if now >= deadline:
                timed_out = True
                stage.terminate(now)
            elif now >= next_check:
                next_check = now + interval
                if should_stop():
                    stopped = True
                    stage.terminate(now)
    except BaseException:
        # A callback (or ^C) interrupts us: the stage must not outlive this call.
        stage.abort()
        raise
    finally:
        stage.close()
    return stage.result(timed_out, timeout_s, stopped, total)
