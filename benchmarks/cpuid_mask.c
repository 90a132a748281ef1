/* Hide instruction sets from a process: an older CPU emulated on a newer one (benchmarks/emulate_isa.py).
 *
 * Loaded with LD_PRELOAD and CPUID_MASK_ISA=avx512-bf16|avx512-vnni|avx2, it turns on Linux's CPUID faulting for the
 * process (arch_prctl ARCH_SET_CPUID 0; the CPU must list "cpuid_fault" in /proc/cpuinfo). Every cpuid
 * instruction then raises SIGSEGV; the handler runs the real cpuid, clears the feature bits of the hidden
 * instruction sets and steps over the instruction. oneDNN (OpenVINO, PyTorch), ONNX Runtime's MLAS and MKL
 * all pick their kernels from cpuid, so all of them run what the older CPU would.
 *
 * Faulting is per thread, inherited by threads and forks, and reset by execve: a child process that keeps
 * LD_PRELOAD masks itself again. The C library picked its own string routines before this runs.
 *
 * The program keeps its own SIGSEGV handling: sigaction() and signal() for SIGSEGV are answered here (the
 * program sees and sets its handler as usual, e.g. Python's faulthandler), this handler stays installed, and
 * a fault that is not a cpuid goes to the program's handler, or ends the process if it has none. SIGSEGV is
 * never blocked: a thread that blocks every signal (thread pools often do) would otherwise be killed by its
 * first cpuid (the kernel cannot deliver a blocked fault). Blocking it changes nothing else, since a real
 * fault ends the process whether blocked or not.
 *
 *   avx512-bf16  AVX-512 with VNNI and BF16, no AMX, no AVX-512 FP16, no AVX-VNNI (an AMD Zen 4 EPYC)
 *   avx512-vnni  AVX-512 with VNNI, no AMX, no AVX-512 BF16/FP16, no AVX-VNNI (a Cascade/Ice Lake server)
 *   avx2         AVX2 and FMA, no AVX-512, no VNNI of either width, no AMX (a Haswell-to-Skylake client)
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

/* Bits cleared: leaf 7 subleaf 0 (ebx, ecx, edx) and subleaf 1 (eax, edx). */
struct mask {
    uint32_t l7_ebx, l7_ecx, l7_edx, l71_eax, l71_edx;
};

/* No AMX (bf16 22, tile 24, int8 25; fp16 7.1 eax 21, complex 7.1 edx 8), no AVX-512 FP16 (23) or BF16
 * (7.1 eax 5), no AVX-VNNI (7.1 eax 4), no AVX10 (7.1 edx 19). */
static const struct mask NO_AMX = {0, 0, BIT(22) | BIT(23) | BIT(24) | BIT(25), BIT(4) | BIT(5) | BIT(21),
                                   BIT(8) | BIT(19)};
/* And no AVX-512 at all: F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31; VBMI 1, VBMI2 6, VNNI 11,
 * BITALG 12, VPOPCNTDQ 14; 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8; AVX-IFMA 7.1 eax 23; AVX-VNNI-INT8 and
 * AVX-NE-CONVERT 7.1 edx 4, 5. */
static const struct mask NO_AVX512 = {
    BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31),
    BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14),
    BIT(2) | BIT(3) | BIT(8),
    BIT(23),
    BIT(4) | BIT(5),
};

static struct mask hidden;
static struct sigaction program; /* the SIGSEGV action the program asked for (or had before us) */
static int installed;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
typedef void (*handler_fn)(int);

static sigaction_fn libc_sigaction(void) {
    static sigaction_fn next;
    if (next == NULL)
        next = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return next;
}

static long set_cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

/* A fault that is not a cpuid: the program's handler runs it, or the default action ends the process. */
static void to_program(int sig, siginfo_t *info, void *context) {
    if (program.sa_flags & SA_SIGINFO) {
        program.sa_sigaction(sig, info, context);
    } else if (program.sa_handler != SIG_DFL && program.sa_handler != SIG_IGN) {
        program.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        libc_sigaction()(SIGSEGV, &dfl, NULL); /* the instruction runs again and faults under it */
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (info->si_code == SI_USER || info->si_code == SI_TKILL || ip[0] != 0x0f || ip[1] != 0xa2) {
        to_program(sig, info, context);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    set_cpuid_faulting(0);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid_faulting(1);
    if (leaf == 7 && sub == 0) {
        b &= ~hidden.l7_ebx;
        c &= ~hidden.l7_ecx;
        d &= ~hidden.l7_edx;
    } else if (leaf == 7 && sub == 1) {
        a &= ~hidden.l71_eax;
        d &= ~hidden.l71_edx;
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

/* The program's view of SIGSEGV: its own handler, while this one stays installed. */
int sigaction(int sig, const struct sigaction *action, struct sigaction *old) {
    if (sig != SIGSEGV || !installed)
        return libc_sigaction()(sig, action, old);
    if (old != NULL)
        *old = program;
    if (action != NULL)
        program = *action;
    return 0;
}

handler_fn signal(int sig, handler_fn handler) {
    static handler_fn (*next)(int, handler_fn);
    if (sig != SIGSEGV || !installed) {
        if (next == NULL)
            next = (handler_fn(*)(int, handler_fn))dlsym(RTLD_NEXT, "signal");
        return next(sig, handler);
    }
    handler_fn before = program.sa_handler; /* shares its storage with sa_sigaction */
    memset(&program, 0, sizeof program);
    program.sa_handler = handler;
    return before;
}

/* The signal masks the program sets, without SIGSEGV; ``next``: the C library's function called ``name``. */
typedef int (*mask_fn)(int, const sigset_t *, sigset_t *);

static int without_segv(mask_fn *next, const char *name, int how, const sigset_t *set, sigset_t *old) {
    sigset_t copy;
    if (*next == NULL)
        *next = (mask_fn)dlsym(RTLD_NEXT, name);
    if (installed && set != NULL && how != SIG_UNBLOCK && sigismember(set, SIGSEGV)) {
        copy = *set;
        sigdelset(&copy, SIGSEGV);
        set = &copy;
    }
    return (*next)(how, set, old);
}

int pthread_sigmask(int how, const sigset_t *set, sigset_t *old) {
    static mask_fn next;
    return without_segv(&next, "pthread_sigmask", how, set, old);
}

int sigprocmask(int how, const sigset_t *set, sigset_t *old) {
    static mask_fn next;
    return without_segv(&next, "sigprocmask", how, set, old);
}

__attribute__((constructor)) static void mask_cpuid(void) {
    const char *isa = getenv("CPUID_MASK_ISA");
    if (isa == NULL || *isa == '\0')
        return;
    if (strcmp(isa, "avx512-vnni") == 0) {
        hidden = NO_AMX;
    } else if (strcmp(isa, "avx512-bf16") == 0) {
        hidden = NO_AMX;
        hidden.l71_eax &= ~BIT(5); /* keep AVX-512 BF16 */
    } else if (strcmp(isa, "avx2") == 0) {
        hidden.l7_ebx = NO_AMX.l7_ebx | NO_AVX512.l7_ebx;
        hidden.l7_ecx = NO_AMX.l7_ecx | NO_AVX512.l7_ecx;
        hidden.l7_edx = NO_AMX.l7_edx | NO_AVX512.l7_edx;
        hidden.l71_eax = NO_AMX.l71_eax | NO_AVX512.l71_eax;
        hidden.l71_edx = NO_AMX.l71_edx | NO_AVX512.l71_edx;
    } else {
        fprintf(stderr, "cpuid_mask: CPUID_MASK_ISA=%s: use avx512-bf16, avx512-vnni or avx2\n", isa);
        _exit(3);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    /* Not SA_ONSTACK: with it, `mae-deploy bench` on OpenVINO bf16 was killed by a SIGSEGV the handler never
     * saw (most likely a signal frame that a thread's small alternate stack could not hold). */
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (libc_sigaction()(SIGSEGV, &action, &program) != 0 || set_cpuid_faulting(1) != 0) {
        fprintf(stderr, "cpuid_mask: this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo)\n");
        _exit(3);
    }
    installed = 1;
}
