//! The seccomp allow-list: the system calls a relay process makes (tokio, rustls and aws-lc,
//! glibc or musl), and nothing that starts a program, traces or reads another process, mounts,
//! loads kernel code or keys, or makes namespaces. A call outside the list fails with `EPERM`
//! (`Mode::Enforce`) or is logged by the kernel and allowed (`Mode::Warn`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SandboxError;

/// Calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // Files and descriptors (Landlock decides which files).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_openat,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    // Sockets (`socket` itself is limited to some families below).
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_membarrier,
    // Threads, signals, time.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_clone3,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // The process's own facts.
    libc::SYS_getrandom,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getrlimit,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_arch_prctl,
];

/// The older calls x86_64 has besides their `*at` and `p*` successors (glibc and musl use
/// some of them).
#[cfg(target_arch = "x86_64")]
const ALLOWED_LEGACY: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_pipe,
    libc::SYS_dup2,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_create,
    libc::SYS_accept,
    libc::SYS_time,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_LEGACY: &[libc::c_long] = &[];

/// Socket families: IP, local sockets, and netlink (glibc's `getaddrinfo` asks the kernel
/// for the host's addresses over it).
const FAMILIES: &[libc::c_int] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// `ioctl` requests: non-blocking and close-on-exec flags, bytes waiting, and whether a
/// descriptor is a terminal (for coloured logs).
const IOCTLS: &[libc::c_ulong] = &[
    libc::FIONBIO,
    libc::FIOCLEX,
    libc::FIONCLEX,
    libc::FIONREAD,
    libc::TCGETS,
    libc::TIOCGWINSZ,
];

/// `prctl` options: thread names and reading the process's own flags.
const PRCTLS: &[libc::c_int] = &[
    libc::PR_SET_NAME,
    libc::PR_GET_NAME,
    libc::PR_GET_NO_NEW_PRIVS,
    libc::PR_GET_SECCOMP,
    libc::PR_GET_DUMPABLE,
    libc::PR_CAPBSET_READ,
];

/// Installs the filters; returns how many calls the allow-list holds.
pub(super) fn apply(enforce: bool) -> Result<usize, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Kernel(format!("seccomp: {e}")))?;
    let built = |rules, mismatch, matched| -> Result<BpfProgram, SandboxError> {
        SeccompFilter::new(rules, mismatch, matched, arch)
            .and_then(BpfProgram::try_from)
            .map_err(|e| SandboxError::Kernel(format!("seccomp filter: {e}")))
    };
    // clone3 passes its flags in memory, which a filter cannot read: it fails with ENOSYS, so
    // that glibc starts threads with clone, whose flags the allow-list checks.
    let clone3 = built(
        [(libc::SYS_clone3, Vec::new())].into(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let allow = allow_list()?;
    let calls = allow.len();
    let mismatch = if enforce {
        SeccompAction::Errno(libc::EPERM as u32)
    } else {
        SeccompAction::Log
    };
    let allow = built(allow, mismatch, SeccompAction::Allow)?;
    let install = |program: &BpfProgram| {
        seccompiler::apply_filter(program)
            .map_err(|e| SandboxError::Kernel(format!("seccomp: {e}")))
    };
    install(&clone3)?;
    install(&allow)?;
    Ok(calls)
}

/// The allow-list: each call with the argument conditions it needs (none: any arguments).
fn allow_list() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let bad = |e: seccompiler::BackendError| SandboxError::Kernel(format!("seccomp rule: {e}"));
    let equals = |arg: u8, len: SeccompCmpArgLen, value: u64| {
        SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(bad)
    };
    let one_of = |arg: u8, values: &mut dyn Iterator<Item = u64>| {
        values
            .map(|v| equals(arg, SeccompCmpArgLen::Dword, v))
            .collect::<Result<Vec<_>, _>>()
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(ALLOWED_LEGACY)
        .map(|&call| (call, Vec::new()))
        .collect();
    // Threads only: a clone without CLONE_THREAD would be a new process.
    let thread = libc::CLONE_THREAD as u64;
    let clone = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(bad)?;
    rules.insert(libc::SYS_clone, vec![clone]);
    rules.insert(
        libc::SYS_socket,
        one_of(0, &mut FAMILIES.iter().map(|&f| f as u64))?,
    );
    rules.insert(libc::SYS_ioctl, one_of(1, &mut IOCTLS.iter().copied())?);
    rules.insert(
        libc::SYS_prctl,
        one_of(0, &mut PRCTLS.iter().map(|&o| o as u64))?,
    );
    // Reading limits, not setting them (the new limit pointer is null).
    rules.insert(
        libc::SYS_prlimit64,
        vec![equals(2, SeccompCmpArgLen::Qword, 0)?],
    );
    Ok(rules)
}
