//! Facts about this machine and its current interface addresses.

use std::net::IpAddr;

use herald_shared::protocol::Facts;

/// Host facts for `Hello` and `Enroll`.
pub fn facts() -> Facts {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    Facts {
        hostname: hostname(),
        os: sysinfo::System::long_os_version().unwrap_or_default(),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        platform: herald_shared::release::this_platform(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory: system.total_memory(),
    }
}

/// The host name, or `agent` if it cannot be read.
pub fn hostname() -> String {
    sysinfo::System::host_name().unwrap_or_else(|| "agent".into())
}

/// Non-loopback interface addresses, sorted (link-local IPv6 left out: it says nothing
/// about where the machine is).
pub fn addresses() -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback())
        .map(|i| i.ip())
        .filter(|ip| match ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => true,
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}
