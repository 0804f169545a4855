//! Free loopback ports.
//!
//! The kit asks the kernel for a free port by binding `127.0.0.1:0`, then
//! releases it so the server can bind it. Another process may take the port
//! in between; launchers detect that (the server exits with "address already
//! in use") and retry with fresh ports, up to [`MAX_START_ATTEMPTS`] times.

use std::net::TcpListener;

use crate::{Error, Result};

/// How many times a launcher tries fresh ports before giving up.
pub const MAX_START_ATTEMPTS: u32 = 5;

/// `n` distinct free ports on 127.0.0.1. All listeners are held until the
/// last port is chosen, so the ports differ from each other.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::io("binding 127.0.0.1:0", e)))
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| Error::io("reading local address", e)))
        .collect()
}

/// One free port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

/// Does this log text say a listener could not bind its port?
pub(crate) fn is_port_collision(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address already in use") || log.contains("addrinuse")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports = free_ports(8).unwrap();
        let mut sorted = ports.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        assert!(ports.iter().all(|&p| p != 0));
        let _l = TcpListener::bind(("127.0.0.1", ports[0])).unwrap();
    }

    #[test]
    fn recognizes_collisions() {
        assert!(is_port_collision("[FTL] Error listening on port: 127.0.0.1:4222, \"address already in use\""));
        assert!(is_port_collision(
            "# Warning: Could not create server TCP listening socket 127.0.0.1:6379: bind: Address already in use"
        ));
        assert!(!is_port_collision("[INF] Server is ready"));
    }
}
