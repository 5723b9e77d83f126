//! The listening addresses a configuration binds, and whether HAProxy could bind the new ones.
//!
//! HAProxy cannot be asked "could you bind this?" without a reload, and a reload whose new
//! process cannot bind pauses the old process's listeners while it retries (about 2 s in which
//! every route is refused). So before a change reaches HAProxy, flow-proxy binds each address the
//! candidate configuration listens on and the running one does not (those the running HAProxy
//! holds are its own), then releases it at once. A failure names the address and, when `/proc`
//! tells, the program that holds it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a new listening address cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Another socket already listens there.
    #[error(
        "port {port} ({address}) is already in use{}; choose another srcPort or stop that program",
        holder.as_ref().map(|holder| format!(" by {holder}")).unwrap_or_default(),
        port = address.port()
    )]
    InUse {
        address: SocketAddr,
        /// The program holding it, e.g. `nc (pid 1234)`, when `/proc` tells.
        holder: Option<String>,
    },
    /// The port is privileged and flow-proxy (whose rights HAProxy has) may not bind it.
    #[error(
        "port {port} ({address}) cannot be bound: permission denied (ports below 1024 need root \
         or CAP_NET_BIND_SERVICE)",
        port = address.port()
    )]
    NeedsPrivilege { address: SocketAddr },
    /// Any other reason, e.g. an address this machine does not have.
    #[error("port {port} ({address}) cannot be bound: {source}", port = address.port())]
    Unavailable {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Checks that every address `candidate` binds and `running` does not can be bound now.
pub fn check_new_binds(running: &str, candidate: &str) -> Result<(), PortError> {
    let held = bind_addresses(running);
    for address in bind_addresses(candidate).difference(&held) {
        try_bind(*address)?;
    }
    Ok(())
}

/// Binds `address` the way HAProxy does and releases it at once.
fn try_bind(address: SocketAddr) -> Result<(), PortError> {
    match bind_like_haproxy(address) {
        Ok(()) => Ok(()),
        Err(source) => Err(match source.kind() {
            std::io::ErrorKind::AddrInUse => PortError::InUse {
                address,
                holder: holder_of(address.port()),
            },
            std::io::ErrorKind::PermissionDenied => PortError::NeedsPrivilege { address },
            _ => PortError::Unavailable { address, source },
        }),
    }
}

/// A TCP socket bound to `address` with HAProxy's options, closed again: SO_REUSEADDR (a port
/// left in TIME_WAIT is free) and SO_REUSEPORT (a port an HAProxy process that is stopping still
/// holds is free for the next one, as HAProxy itself finds; a program holding it without
/// SO_REUSEPORT keeps it).
fn bind_like_haproxy(address: SocketAddr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())
}

/// The TCP addresses of the `bind` lines of an haproxy.cfg (`*` and an empty host are every
/// IPv4 address, as HAProxy reads them). UNIX sockets and inherited file descriptors are not
/// ports and are left out.
pub fn bind_addresses(config: &str) -> BTreeSet<SocketAddr> {
    let mut addresses = BTreeSet::new();
    for line in config.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("bind") {
            continue;
        }
        let Some(list) = words.next() else {
            continue;
        };
        for item in list.split(',') {
            addresses.extend(parse_bind_item(item));
        }
    }
    addresses
}

/// One `bind` address: `[proto@]host:port[-last]`.
fn parse_bind_item(item: &str) -> Vec<SocketAddr> {
    let (family, rest) = match item.split_once('@') {
        Some(("ipv4" | "tcp" | "tcp4", rest)) => (Some(false), rest),
        Some(("ipv6" | "tcp6", rest)) => (Some(true), rest),
        Some(_) => return Vec::new(),
        None => (None, item),
    };
    let Some((host, ports)) = rest.rsplit_once(':') else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = match host {
        "" | "*" if family == Some(true) => Ipv6Addr::UNSPECIFIED.into(),
        "" | "*" => Ipv4Addr::UNSPECIFIED.into(),
        "::" => Ipv6Addr::UNSPECIFIED.into(),
        _ => match host.parse() {
            Ok(ip) => ip,
            Err(_) => return Vec::new(),
        },
    };
    let (first, last) = match ports.split_once('-') {
        Some((first, last)) => (first.parse::<u16>(), last.parse::<u16>()),
        None => (ports.parse::<u16>(), ports.parse::<u16>()),
    };
    match (first, last) {
        (Ok(first), Ok(last)) => (first..=last)
            .map(|port| SocketAddr::new(ip, port))
            .collect(),
        _ => Vec::new(),
    }
}

/// Most holders one refusal names.
const MAX_HOLDERS_NAMED: usize = 3;

/// `comm (pid N)` of the processes with a socket listening on `port`, read from `/proc` (which
/// shows another user's processes only to root). Several may hold it: a program and its
/// children, or a child caught between fork and exec, which holds its parent's sockets.
fn holder_of(port: u16) -> Option<String> {
    let mut entries = procfs::net::tcp().unwrap_or_default();
    entries.extend(procfs::net::tcp6().unwrap_or_default());
    let inodes: BTreeSet<u64> = entries
        .iter()
        .filter(|entry| {
            entry.local_address.port() == port
                && entry.state == procfs::net::TcpState::Listen
                && entry.inode != 0
        })
        .map(|entry| entry.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let processes = procfs::process::all_processes().ok()?;
    let mut holders = Vec::new();
    for process in processes.flatten() {
        let Ok(fds) = process.fd() else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            matches!(fd.target, procfs::process::FDTarget::Socket(inode) if inodes.contains(&inode))
        });
        if holds {
            let name = process
                .stat()
                .map(|stat| stat.comm)
                .unwrap_or_else(|_| "a process".to_string());
            holders.push(format!("{name} (pid {})", process.pid));
            if holders.len() == MAX_HOLDERS_NAMED {
                break;
            }
        }
    }
    if holders.is_empty() {
        return Some("another program".to_string());
    }
    Some(holders.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_lines_become_addresses() {
        let config = "frontend http\n    bind *:80\nfrontend tcp_5000\n    bind 127.0.0.1:5000\n\
                      frontend v6\n    bind [::1]:8443,ipv6@:9000-9001\n    stats socket unix@x\n\
                      frontend sock\n    bind unix@/tmp/x.sock\n";
        let addresses: Vec<String> = bind_addresses(config)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            addresses,
            [
                "0.0.0.0:80",
                "127.0.0.1:5000",
                "[::]:9000",
                "[::]:9001",
                "[::1]:8443"
            ]
        );
    }

    #[test]
    fn a_port_held_by_this_process_is_refused_with_its_holder() {
        let held = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = held.local_addr().expect("address").port();
        let candidate = format!("frontend tcp\n    bind 127.0.0.1:{port}\n");
        match check_new_binds("", &candidate) {
            Err(PortError::InUse { address, holder }) => {
                assert_eq!(address.port(), port);
                let holder = holder.expect("/proc names the holder");
                assert!(
                    holder.contains(&format!("(pid {})", std::process::id())),
                    "{holder}"
                );
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        // The running configuration's own listeners are HAProxy's: not checked.
        assert!(check_new_binds(&candidate, &candidate).is_ok());
    }

    /// Drops CAP_NET_BIND_SERVICE from the calling thread's effective capabilities (Linux keeps
    /// capabilities per thread), so root binds like an ordinary user.
    fn drop_net_bind_service_in_this_thread() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_NET_BIND_SERVICE: u32 = 10;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a valid v3 header and two data structs, as capget(2) says.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            data[0].effective &= !(1 << CAP_NET_BIND_SERVICE);
            assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
        }
    }

    #[test]
    fn a_privileged_port_without_the_right_is_refused_with_what_is_needed() {
        let unprivileged_from: u16 =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(1024);
        if unprivileged_from == 0 {
            return; // Every port is unprivileged on this machine: nothing to refuse.
        }
        let outcome = std::thread::spawn(|| {
            drop_net_bind_service_in_this_thread();
            check_new_binds("", "frontend tcp_1\n    bind 127.0.0.1:1\n")
        })
        .join()
        .expect("the check runs");
        match outcome {
            Err(error @ PortError::NeedsPrivilege { .. }) => assert!(
                error
                    .to_string()
                    .contains("ports below 1024 need root or CAP_NET_BIND_SERVICE"),
                "{error}"
            ),
            other => panic!("expected NeedsPrivilege, got {other:?}"),
        }
    }
}
