//! The Landlock part of the sandbox: read-only files, TCP ports to bind and to connect to,
//! and the scopes (no signal to, no abstract socket of, a process outside the sandbox).

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, NetPort,
    PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use super::{Applied, Rules, SandboxError};
use crate::config::PortRange;

/// The Landlock ABI whose rights relay asks for (Linux 6.15); older kernels get what they have.
const LANDLOCK_ABI: ABI = ABI::V7;

/// Files every process reads to resolve names (glibc reads them, and loads its NSS modules).
const NAME_RESOLUTION: &[&str] = &[
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/services",
    "/etc/ld.so.cache",
    "/lib",
    "/lib64",
    "/usr/lib",
];

/// What the process reads of itself and of its host: `/proc/self` (resident memory for the
/// memory budget and the metrics), its executable (symbols for a panic's backtrace), the
/// cgroup's memory and CPU limits, the host name (in the agent's syslog records).
const SELF_INSPECTION: &[&str] = &[
    "/proc/self",
    "/proc/self/exe",
    "/sys/fs/cgroup",
    "/proc/sys/kernel/hostname",
];

/// Applies the Landlock part of `rules`, recording the outcome in `applied`.
pub(super) fn apply(
    rules: &Rules,
    require: bool,
    applied: &mut Applied,
) -> Result<(), SandboxError> {
    let kernel = |e: landlock::RulesetError| SandboxError::Kernel(format!("Landlock: {e}"));
    let level = if require {
        CompatLevel::HardRequirement
    } else {
        CompatLevel::BestEffort
    };
    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .map_err(kernel)?
        .scope(Scope::from_all(LANDLOCK_ABI))
        .map_err(kernel)?;
    if rules.bind.is_some() {
        ruleset = ruleset.handle_access(AccessNet::BindTcp).map_err(kernel)?;
    }
    if rules.connect.is_some() {
        ruleset = ruleset
            .handle_access(AccessNet::ConnectTcp)
            .map_err(kernel)?;
    }
    let mut created = ruleset.create().map_err(kernel)?;
    let dir_read = AccessFs::ReadFile | AccessFs::ReadDir;
    let mut read = rules.read_dirs();
    read.extend(
        NAME_RESOLUTION
            .iter()
            .chain(SELF_INSPECTION)
            .map(PathBuf::from),
    );
    for path in &read {
        // A path that does not exist here (no /lib64, no cgroup) needs no rule.
        let Ok(fd) = PathFd::new(path) else { continue };
        let access = if path.is_dir() {
            dir_read
        } else {
            AccessFs::ReadFile.into()
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| {
                SandboxError::Kernel(format!("Landlock rule for {}: {e}", path.display()))
            })?;
    }
    applied.read = read.into_iter().filter(|p| p.exists()).collect();
    for (ranges, access) in [
        (&rules.bind, AccessNet::BindTcp),
        (&rules.connect, AccessNet::ConnectTcp),
    ] {
        for port in ranges.iter().flatten().flat_map(PortRange::iter) {
            created = created
                .add_rule(NetPort::new(port, access))
                .map_err(kernel)?;
        }
    }
    let status = created.restrict_self().map_err(kernel)?;
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => Some(effective_abi as i32),
        _ => None,
    };
    applied.landlock_net = abi.is_some_and(|a| a >= 4);
    applied.landlock_enforced = status.ruleset != RulesetStatus::NotEnforced;
    applied.landlock = match (status.ruleset, abi) {
        (RulesetStatus::FullyEnforced, Some(abi)) => format!("fully enforced (ABI {abi})"),
        (RulesetStatus::PartiallyEnforced, Some(abi)) => format!(
            "partially enforced (kernel ABI {abi}{})",
            if abi < 4 { ": no TCP port rules" } else { "" }
        ),
        (_, _) => format!("not enforced ({:?})", status.landlock),
    };
    Ok(())
}
