// Issue 9 experiment (see issue9-ptrace-protocol.md): what happens to a tracee when its tracer
// dies (raise(SIGKILL)) at a given ptrace step.  Build: gcc -O1 -o t issue9-ptrace-experiment.c
// Run as root: ./t MODE   (env: TGT=read|sleep|epoll, STOPPED=1 (SIGSTOP the target first),
// WNOWAITALL=1 (observe every stop with waitid WNOWAIT), WANTUSR1=1 (for sig-* modes)).
// Modes: die-at-eventstop step-die-running step-die-at-trap step-full sys-die-entry
//        sys-die-entry-nosysgood sys-nowait sys-nowait-nosysgood die-after-subst
//        net-die-after-subst net-die-at-exit-stop die-after-rewind full net-full
//        full-rewind-eintr sig-lost sig-nowait
// The target checks after its read(2) that rax, the buffer, rdi/rsi/rdx, r12 and xmm8 are right.
// Experiment: what happens to a tracee when its tracer dies at various ptrace steps.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <signal.h>
#include <errno.h>
#include <stdint.h>
#include <cpuid.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <sys/user.h>
#include <sys/uio.h>
#include <linux/elf.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/syscall.h>

#ifndef PTRACE_GETSIGMASK
#define PTRACE_GETSIGMASK 0x420a
#endif

__attribute__((naked, used)) void gad(void) { asm volatile("ret\n\tmov $15, %eax\n\tsyscall\n\tud2"); }

static int do_read_check(int fd) {
  char buf[1] = {0};
  long rax = 0, o_rdi, o_rsi, o_rdx; unsigned long x8_in = 0x1122334455667788UL, x8_out;
  register long r12 asm("r12") = 0x5a5a5a5a;
  long o_r12;
  asm volatile("movq %[x8in], %%xmm8\n\tsyscall\n\tmovq %%rdi, %[a]\n\tmovq %%rsi, %[b]\n\tmovq %%rdx, %[c]\n\tmovq %%xmm8, %[d]\n\tmovq %%r12, %[e]"
    : "+a"(rax), [a]"=&r"(o_rdi), [b]"=&r"(o_rsi), [c]"=&r"(o_rdx), [d]"=&r"(x8_out), [e]"=&r"(o_r12)
    : "D"((long)fd), "S"((long)buf), "d"(1L), [x8in]"r"(x8_in), "r"(r12)
    : "rcx", "r11", "memory", "xmm8");
  int bad = 0;
  if (rax != 1) bad |= 1; if (buf[0] != 'x') bad |= 2; if (o_rdi != fd) bad |= 4;
  if (o_rsi != (long)buf) bad |= 8; if (o_rdx != 1) bad |= 16; if (x8_out != x8_in) bad |= 32; if (o_r12 != 0x5a5a5a5a) bad |= 64;
  if (bad) fprintf(stderr, "target: rax=%ld bad=%#x\n", rax, bad);
  return bad;
}


static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec / 1e9; }
static volatile int got_usr1;
static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void target(int fd) {
  struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_handler = on_usr1; sa.sa_flags = SA_RESTART; sigaction(SIGUSR1, &sa, NULL);
  if (getenv("WANTUSR1")) { int b = do_read_check(fd); fprintf(stderr, "target: got_usr1=%d\n", got_usr1); exit(b ? 3 : got_usr1 ? 0 : 5); }
  const char *k = getenv("TGT");
  if (k && !strcmp(k, "sleep")) {
    struct timespec ts = {0, 300000000}; double t0 = now();
    long r = syscall(SYS_nanosleep, &ts, NULL); double el = now() - t0;
    fprintf(stderr, "target: nanosleep=%ld errno=%d elapsed=%.3f\n", r, r ? errno : 0, el);
    exit(r == 0 && el >= 0.3 && el < 0.4 ? 0 : 3);
  }
  if (k && !strcmp(k, "epoll")) {
    int ep = epoll_create1(0); struct epoll_event ev = {EPOLLIN, {0}}; epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    long r = syscall(SYS_epoll_wait, ep, &ev, 1, -1);
    fprintf(stderr, "target: epoll_wait=%ld errno=%d\n", r, r < 0 ? errno : 0);
    exit(r == 1 ? 0 : 3);
  }
  exit(do_read_check(fd) ? 3 : 0);
}

#define CK(x) do { if ((x) < 0) { perror(#x); _exit(100); } } while (0)

static int wstop(pid_t t) {
  if (getenv("WNOWAITALL")) { siginfo_t si; memset(&si, 0, sizeof si);
    if (waitid(P_PID, t, &si, WSTOPPED | WEXITED | __WALL | WNOWAIT) < 0) { perror("waitid"); _exit(101); }
    if (si.si_code != CLD_TRAPPED) { fprintf(stderr, "tracer: code %d\n", si.si_code); _exit(101); }
    return (si.si_status << 8) | 0x7f; }
  int st; CK(waitpid(t, &st, __WALL)); if (!WIFSTOPPED(st)) { fprintf(stderr, "tracer: st %#x\n", st); _exit(101);} return st; }

static void die(void) { raise(SIGKILL); }

static unsigned xstate_end(uint64_t bv) {
  unsigned end = 576;
  for (int i = 2; i < 63; i++) if (bv & (1ULL << i)) { unsigned a,b,c,d; __cpuid_count(0xd, i, a, b, c, d); if (b + a > end) end = b + a; }
  return end;
}

struct ksigctx { uint64_t r8,r9,r10,r11,r12,r13,r14,r15,rdi,rsi,rbp,rbx,rdx,rax,rcx,rsp,rip,eflags; uint16_t cs,gs,fs,ss; uint64_t err,trapno,oldmask,cr2,fpstate,reserved1[8]; };
struct kuc { uint64_t uc_flags, uc_link; uint64_t ss_sp; int32_t ss_flags, pad; uint64_t ss_size; struct ksigctx mc; uint64_t uc_sigmask; };
struct kframe { uint64_t pretcode; struct kuc uc; };

static void wmem(pid_t t, uint64_t addr, void *p, size_t n) {
  struct iovec l = {p, n}, r = {(void*)addr, n};
  if (process_vm_writev(t, &l, 1, &r, 1, 0) != (ssize_t)n) { perror("pvw"); _exit(102); }
}

// builds the safety-net frame restoring C (clean state) and returns the new rsp
static uint64_t build_net(pid_t t, struct user_regs_struct *E, struct user_regs_struct *C) {
  static uint8_t xs[65536] __attribute__((aligned(64)));
  struct iovec iov = {xs, sizeof xs};
  CK(ptrace(PTRACE_GETREGSET, t, NT_X86_XSTATE, &iov));
  uint64_t bv = *(uint64_t*)(xs + 512);
  unsigned sz = xstate_end(bv);
  uint32_t *sw = (uint32_t*)(xs + 464);
  sw[0] = 0x46505853; sw[1] = sz + 4; *(uint64_t*)(sw + 2) = bv | 3; sw[4] = sz;
  memset(xs + 464 + 20, 0, 48 - 20);
  *(uint32_t*)(xs + sz) = 0x46505845;
  uint64_t mask; CK(ptrace(PTRACE_GETSIGMASK, t, 8, &mask));
  uint64_t top = E->rsp - 128;
  uint64_t fp = (top - (sz + 4)) & ~63ULL;
  uint64_t fr = ((fp - sizeof(struct kframe)) & ~15ULL) - 8;
  struct kframe f; memset(&f, 0, sizeof f);
  f.pretcode = (uint64_t)gad + 1;
  f.uc.uc_flags = 1 | 2 | 4; f.uc.ss_flags = 0x7777;
  struct ksigctx *m = &f.uc.mc;
  m->r8=C->r8; m->r9=C->r9; m->r10=C->r10; m->r11=C->r11; m->r12=C->r12; m->r13=C->r13; m->r14=C->r14; m->r15=C->r15;
  m->rdi=C->rdi; m->rsi=C->rsi; m->rbp=C->rbp; m->rbx=C->rbx; m->rdx=C->rdx; m->rax=C->rax; m->rcx=C->rcx; m->rsp=C->rsp; m->rip=C->rip; m->eflags=C->eflags;
  m->cs = C->cs; m->ss = C->ss; m->fpstate = fp;
  f.uc.uc_sigmask = mask;
  wmem(t, fp, xs, sz + 4);
  wmem(t, fr, &f, sizeof f);
  return fr;
}

static void tracer(pid_t t, const char *mode) {
  int opts = strstr(mode, "nosysgood") ? 0 : PTRACE_O_TRACESYSGOOD;
  CK(ptrace(PTRACE_SEIZE, t, 0, opts));
  CK(ptrace(PTRACE_INTERRUPT, t, 0, 0));
  int st0 = wstop(t);
  fprintf(stderr, "tracer: event stop %#x\n", st0 >> 8);
  if (!strcmp(mode, "die-at-eventstop")) die();
  if (!strncmp(mode, "sig-", 4)) {
    CK(ptrace(PTRACE_SYSCALL, t, 0, 0));
    int s = wstop(t); fprintf(stderr, "tracer: stop %#x (entry)\n", s >> 8);
    syscall(SYS_tgkill, t, t, SIGUSR1);
    CK(ptrace(PTRACE_SYSCALL, t, 0, 0));
    s = wstop(t); fprintf(stderr, "tracer: stop %#x (exit)\n", s >> 8);
    CK(ptrace(PTRACE_SYSCALL, t, 0, 0));
    if (!strcmp(mode, "sig-nowait")) {
      siginfo_t si; CK(waitid(P_PID, t, &si, WSTOPPED | __WALL | WNOWAIT));
      fprintf(stderr, "tracer: waitid WNOWAIT code %d status %#x\n", si.si_code, si.si_status);
    } else { s = wstop(t); fprintf(stderr, "tracer: stop %#x (signal)\n", s >> 8); }
    die();
  }
  struct user_regs_struct R0, R; CK(ptrace(PTRACE_GETREGS, t, 0, &R0));
  fprintf(stderr, "tracer: R0 orig_rax=%lld rax=%lld\n", R0.orig_rax, R0.rax);
  if (strstr(mode, "rewind-eintr") && (long long)R0.orig_rax >= 0 && (long long)R0.rax == -EINTR) {
    R = R0; R.rip -= 2; R.rax = R0.orig_rax; R.orig_rax = -1; CK(ptrace(PTRACE_SETREGS, t, 0, &R)); }
  if (!strncmp(mode, "step", 4)) {
    R = R0; R.rip = R0.rip - 2; R.rax = 39; R.orig_rax = -1;
    CK(ptrace(PTRACE_SETREGS, t, 0, &R));
    CK(ptrace(PTRACE_SINGLESTEP, t, 0, 0));
    if (!strcmp(mode, "step-die-running")) die();
    double a = now();
    int st = wstop(t);
    fprintf(stderr, "tracer: step stop sig %d\n", WSTOPSIG(st));
    CK(ptrace(PTRACE_SETREGS, t, 0, &R0));
    if (!strcmp(mode, "step-full")) { CK(ptrace(PTRACE_DETACH, t, 0, 0)); fprintf(stderr, "TIME singlestep->detach %.1f us\n", (now()-a)*1e6); _exit(0); }
    die(); // before PTRACE_DETACH
  }
  // syscall-stop protocol: wait for the restarted call's entry stop
  CK(ptrace(PTRACE_SYSCALL, t, 0, 0));
  if (strstr(mode, "nowait")) { usleep(20000); die(); }
  int st;
  for (;;) {
    st = wstop(t);
    if (WSTOPSIG(st) == (SIGTRAP | 0x80)) break;
    int ev = st >> 16;
    fprintf(stderr, "tracer: non-syscall stop sig %#x event %d -> resume\n", WSTOPSIG(st), ev);
    CK(ptrace(PTRACE_SYSCALL, t, 0, ev ? 0 : WSTOPSIG(st)));
  }
  fprintf(stderr, "tracer: entry stop sig %#x\n", WSTOPSIG(st));
  if (!strncmp(mode, "sys-die-entry", 13)) die();
  struct user_regs_struct E, C; CK(ptrace(PTRACE_GETREGS, t, 0, &E));
  fprintf(stderr, "tracer: entry orig_rax=%lld\n", E.orig_rax);
  C = E; C.rip = E.rip - 2; C.rax = E.orig_rax; C.orig_rax = -1;
  R = E; R.orig_rax = 39; // getpid
  if (strstr(mode, "net")) { struct user_regs_struct Cn = C;
    if ((long long)E.orig_rax == 219 && (long long)R0.rax == -516 && E.rip == R0.rip) Cn.rax = R0.orig_rax;
    R.rsp = build_net(t, &E, &Cn); R.rip = (uint64_t)gad; }
  double a = now();
  CK(ptrace(PTRACE_SETREGS, t, 0, &R));
  if (strstr(mode, "die-after-subst")) die();
  CK(ptrace(PTRACE_SYSCALL, t, 0, 0));
  st = wstop(t);
  struct user_regs_struct X; CK(ptrace(PTRACE_GETREGS, t, 0, &X));
  fprintf(stderr, "tracer: exit stop sig %#x rax=%lld (pid %d)\n", WSTOPSIG(st), X.rax, t);
  if (strstr(mode, "die-at-exit-stop")) die();
  CK(ptrace(PTRACE_SETREGS, t, 0, &C));
  fprintf(stderr, "TIME subst->rewind %.1f us\n", (now()-a)*1e6);
  if (strstr(mode, "die-after-rewind")) die();
  CK(ptrace(PTRACE_DETACH, t, 0, 0));
  _exit(0);
}

int main(int argc, char **argv) {
  const char *mode = argv[1];
  int p[2]; pipe(p);
  pid_t t = fork();
  if (!t) { close(p[1]); target(p[0]); }
  usleep(50000);
  int stopped = getenv("STOPPED") != NULL;
  if (stopped) { kill(t, SIGSTOP); usleep(20000); }
  pid_t tr = fork();
  if (!tr) tracer(t, mode);
  int st; waitpid(tr, &st, 0);
  usleep(20000);
  if (stopped) { char b[256]; snprintf(b, sizeof b, "/proc/%d/stat", t); FILE *f = fopen(b, "r"); fgets(b, sizeof b, f); fclose(f);
    printf("  state after tracer: %c\n", strrchr(b, ')')[2]); kill(t, SIGCONT); }
  write(p[1], "x", 1);
  waitpid(t, &st, 0);
  if (WIFSIGNALED(st)) printf("%-32s target KILLED by signal %d (%s)\n", mode, WTERMSIG(st), strsignal(WTERMSIG(st)));
  else printf("%-32s target exit %d%s\n", mode, WEXITSTATUS(st), WEXITSTATUS(st) ? " (CORRUPTED)" : " (ok)");
  return 0;
}
