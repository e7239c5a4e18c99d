/* The CPU libraries' thread pool: parallel regions that keep going on a busy machine.
 *
 * Compiled with the system C compiler and linked into every CPU library (targets/cpu/toolchain.py);
 * the generated kernels call llmir_parallel() instead of an OpenMP runtime. Why not libgomp: its
 * parallel regions end in a barrier that waits for every thread of the team, including one the OS
 * has not scheduled yet. When another process holds a core, each region then waits for a time
 * slice (milliseconds), and two threads run several times slower than one.
 *
 * Here a region is a task `fn(ctx)` that claims work items from a counter in `ctx` until none are
 * left (the kernels' parallel_for, irbuilder.py), so any number of threads, even one, completes
 * it. The caller runs the task itself; workers join while the region is open and the caller waits
 * only for those that joined. A worker that wakes late finds the region closed and goes back to
 * waiting. Workers spin for a bounded time (LLMIR_SPIN_US) on the region word, then sleep on it
 * (a futex). If the caller finishes its share and then waits long for a joined worker (the OS took
 * that worker's core mid-item), the next regions run on the caller alone for a while (BACKOFF_NS),
 * then threads are tried again.
 *
 * Threads: llmir_set_num_threads(n) (the loader's `threads`), else the CPUs this process may use.
 *
 * Also here: llmir_amx_ready() (Linux hands out AMX tile state only on request, so kernels with an
 * AMX path ask once and fall back when it is refused) and llmir_scratch() (a grow-only buffer per
 * thread that the caller of a parallel region packs operands into).
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 256
#define CLOSED (1ull << 31)          /* in region_state: the region takes no more workers */
#define JOINED_MASK (CLOSED - 1)
#define STALL_NS 200000ll            /* a joined worker this late after the caller is done: stalled */
#define BACKOFF_NS 20000000ll        /* then run regions on the caller alone for this long */

typedef void (*llmir_task)(void *ctx);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;  /* one region at a time, one pool setup */
static int requested;                /* llmir_set_num_threads; 0: every CPU this process may use */
static int started;                  /* worker threads running */
static long long spin_ns = 50000;    /* LLMIR_SPIN_US */
static long long solo_until;         /* monotonic ns: until then, regions run on the caller alone */

/* The current region: its number (high 32 bits) with CLOSED and the joined count (low 32 bits),
 * which workers compare-and-swap to join; the futex word is the region number. */
static _Atomic uint64_t region_state;
static _Atomic uint32_t region_number;
static _Atomic int region_done;
static llmir_task region_fn;
static void *region_ctx;
static int region_max;               /* workers that may join this region */

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void futex_wait(_Atomic uint32_t *word, uint32_t value) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, 1 << 30, NULL, NULL, 0);
}

static inline void pause_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int available_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int llmir_num_threads(void) {
    int n = requested > 0 ? requested : available_cpus();
    return n < MAX_THREADS ? n : MAX_THREADS;
}

void llmir_set_num_threads(int n) {
    requested = n > 0 ? n : 0;
}

static void *worker_main(void *arg) {
    (void)arg;
    uint32_t seen = atomic_load_explicit(&region_number, memory_order_acquire);
    for (;;) {
        /* wait for a new region: spin a while, then sleep on the region word */
        long long deadline = now_ns() + spin_ns;
        uint32_t current;
        int spins = 0;
        while ((current = atomic_load_explicit(&region_number, memory_order_acquire)) == seen) {
            if (++spins % 64 == 0 && now_ns() > deadline) {
                futex_wait(&region_number, seen);
                deadline = now_ns() + spin_ns;
            } else {
                pause_cpu();
            }
        }
        seen = current;
        /* join it if it is still open and wants another worker */
        uint64_t s = atomic_load_explicit(&region_state, memory_order_acquire);
        while ((uint32_t)(s >> 32) == current && !(s & CLOSED) && (int)(s & JOINED_MASK) < region_max) {
            if (atomic_compare_exchange_weak_explicit(&region_state, &s, s + 1, memory_order_acq_rel,
                                                      memory_order_acquire)) {
                region_fn(region_ctx);  /* stable: the caller waits for joined workers */
                atomic_fetch_add_explicit(&region_done, 1, memory_order_release);
                break;
            }
        }
    }
    return NULL;
}

static void forget_workers(void) {  /* in a forked child: the workers did not come along */
    started = 0;
    pthread_mutex_init(&lock, NULL);
}

static void start_workers(int n) {
    static int once;
    if (!once) {
        once = 1;
        pthread_atfork(NULL, NULL, forget_workers);
    }
    const char *env = getenv("LLMIR_SPIN_US");
    if (env) spin_ns = atoll(env) * 1000ll;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 8 << 20);  /* kernels keep tiles and split-K records on the stack */
    while (started < n) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker_main, NULL) != 0) break;
        pthread_detach(t);
        started++;
    }
    pthread_attr_destroy(&attr);
}

/* Runs fn(ctx) on the calling thread and on up to nthreads - 1 workers that join in time; returns
 * when every call has returned. fn must claim its work items dynamically (see above). */
void llmir_parallel(llmir_task fn, void *ctx, int nthreads) {
    if (nthreads > llmir_num_threads()) nthreads = llmir_num_threads();
    if (nthreads < 2 || now_ns() < solo_until) {
        fn(ctx);
        return;
    }
    pthread_mutex_lock(&lock);
    if (started < nthreads - 1) start_workers(nthreads - 1);
    region_fn = fn;
    region_ctx = ctx;
    region_max = nthreads - 1;
    atomic_store_explicit(&region_done, 0, memory_order_relaxed);
    uint32_t number = atomic_load_explicit(&region_number, memory_order_relaxed) + 1;
    atomic_store_explicit(&region_state, (uint64_t)number << 32, memory_order_release);
    atomic_store_explicit(&region_number, number, memory_order_release);
    futex_wake_all(&region_number);
    fn(ctx);
    uint64_t s = atomic_fetch_or_explicit(&region_state, CLOSED, memory_order_acq_rel);
    int joined = (int)(s & JOINED_MASK);
    long long start = 0;
    int spins = 0;
    while (atomic_load_explicit(&region_done, memory_order_acquire) < joined) {
        if (++spins % 64 == 0) {
            long long t = now_ns();
            if (!start) start = t;
            else if (t - start > STALL_NS) {
                solo_until = t + BACKOFF_NS;  /* a worker lost its core: go solo for a while */
                sched_yield();
            }
        }
        pause_cpu();
    }
    pthread_mutex_unlock(&lock);
}

/* 1 when this process may use AMX tiles: asks the kernel for the XTILEDATA state component once
 * (arch_prctl ARCH_REQ_XCOMP_PERM; Linux >= 5.16), 0 when refused, not x86-64 Linux, or turned off
 * with LLMIR_AMX=0 in the environment (the vector paths then run: for comparisons and bisection). */
int llmir_amx_ready(void) {
    static _Atomic int state;  /* 0 unknown, 1 granted, 2 refused */
    int s = atomic_load_explicit(&state, memory_order_acquire);
    if (s == 0) {
#if defined(__x86_64__) && defined(SYS_arch_prctl)
        const char *env = getenv("LLMIR_AMX");
        if (env && env[0] == '0' && env[1] == 0) s = 2;
        else s = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : 2;
#else
        s = 2;
#endif
        atomic_store_explicit(&state, s, memory_order_release);
    }
    return s == 1;
}

/* A 64-byte aligned buffer of at least `bytes`, reused by every call on the calling thread
 * (grow-only; freed when the thread exits; out of memory, the process stops with a message). For
 * the caller of llmir_parallel, before the region. Per thread: two forwards of one library can
 * run at once (two models of one bundle on two threads), and must not pack into each other's
 * operands. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static _Thread_local void *scratch_buffer;
static _Thread_local int64_t scratch_size;

static void scratch_key_create(void) { pthread_key_create(&scratch_key, free); }

void *llmir_scratch(int64_t bytes) {
    if (bytes > scratch_size) {
        pthread_once(&scratch_once, scratch_key_create);
        free(scratch_buffer);
        scratch_size = 0;
        if (posix_memalign(&scratch_buffer, 64, (size_t)bytes) != 0) {
            /* a kernel has no way to return an error: stop with a message, not a segfault */
            static const char msg[] = "llmir: out of memory for a kernel's scratch buffer\n";
            if (write(2, msg, sizeof msg - 1) < 0) { /* nothing more to do */ }
            abort();
        }
        scratch_size = bytes;
        pthread_setspecific(scratch_key, scratch_buffer);  /* its destructor frees it at thread exit */
    }
    return scratch_buffer;
}

/* Multi-step greedy decode (vLLM's num_scheduler_steps): `steps` calls of the library's forward
 * (dims, ptrs as llmir_forward takes them) on a step of B sequences with one token each
 * (T = B = L), each followed on the caller's thread by: token = the first index of the largest
 * logit of each row (NaN first, as NumPy's argmax), written to out[s * B + b] and fed to the next
 * step at position + 1, seq_len + 1 and the slot its block table gives. The caller checks the first
 * and the last step's inputs against the library's limits beforehand (the values in between lie
 * between them); a token at or above token_rows (an embedding table smaller than the logits) ends
 * the run after its step's row is complete. Returns the steps done. */
int64_t llmir_greedy_decode(void (*forward)(int64_t *, void **), int64_t *dims, void **ptrs, int64_t steps,
                            int64_t vocab, int64_t token_rows, int64_t block_size, int32_t *out) {
    int64_t B = dims[1], max_blocks = dims[3];
    int32_t *ids = ptrs[0], *pos = ptrs[1], *slots = ptrs[2], *tables = ptrs[3], *seq_lens = ptrs[4];
    const float *logits = ptrs[9];
    for (int64_t s = 0; s < steps; s++) {
        forward(dims, ptrs);
        int outside = 0;
        for (int64_t b = 0; b < B; b++) {
            const float *row = logits + b * vocab;
            int64_t best = 0;
            for (int64_t i = 0; i < vocab; i++) {
                if (row[i] != row[i]) { best = i; break; }
                if (row[i] > row[best]) best = i;
            }
            out[s * B + b] = (int32_t)best;
            outside |= best >= token_rows;
        }
        if (outside) return s + 1;  /* (after the whole row: every sequence's token of step s is committed) */
        if (s + 1 == steps) break;
        for (int64_t b = 0; b < B; b++) {
            int32_t p = pos[b] + 1;
            ids[b] = out[s * B + b];
            pos[b] = p;
            seq_lens[b] += 1;
            slots[b] = tables[b * max_blocks + p / block_size] * (int32_t)block_size + p % (int32_t)block_size;
        }
    }
    return steps;
}
