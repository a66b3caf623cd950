//! Capability records: what each peer can do, measured by itself, and advertised to the
//! swarm on gossip and in a direct exchange on connect. Wire records are converted into
//! [`PeerRecord`] at the edge with every field checked, so the rest of the daemon never sees
//! a record whose peer id, version or addresses are not valid.

use libp2p::{Multiaddr, PeerId};
use potluck_proto::{DecodeError, PROTOCOL_VERSION, check_version, invalid, v1};

/// Largest encoded capability record we accept (exchange and gossip).
pub const RECORD_LIMIT: usize = 16 * 1024;
/// Addresses carried by one record; a peer with more is truncated by itself, refused by us.
pub const MAX_RECORD_ADDRS: usize = 32;
const MAX_NAME_LEN: usize = 256;

/// The software version this build reports.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Measures this machine: CPU count, memory, device. The training-throughput figure starts
/// at 0 ("not measured") and is filled in through `Client::set_train_throughput` once the
/// worker has timed its reference step.
pub fn measure_local() -> v1::Capabilities {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    let cpu_name = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cpu".to_string());
    let cpu_count = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(sys.cpus().len() as u32);
    v1::Capabilities {
        protocol_version: PROTOCOL_VERSION,
        software_version: SOFTWARE_VERSION.to_string(),
        device_kind: v1::DeviceKind::Cpu as i32,
        device_name: truncate(cpu_name, MAX_NAME_LEN),
        memory_bytes: sys.total_memory(),
        cpu_count,
        train_tokens_per_sec: 0.0,
        bandwidth_bytes_per_sec: 0.0,
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Human-readable form of a measured figure: 0 means the figure was never measured.
pub fn figure(value: f64, unit: &str) -> String {
    if value > 0.0 {
        format!("{value:.1} {unit}")
    } else {
        "not measured".to_string()
    }
}

/// A capability record that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRecord {
    pub peer_id: PeerId,
    pub capabilities: v1::Capabilities,
    pub addrs: Vec<Multiaddr>,
    pub issued_at_ms: u64,
}

impl PeerRecord {
    /// Validates a wire record that arrived from `sender` (the authenticated remote or the
    /// gossip message's signed source): the record must describe the sender itself.
    pub fn from_wire(rec: v1::CapabilityRecord, sender: &PeerId) -> Result<Self, DecodeError> {
        check_version(rec.protocol_version)?;
        let peer_id = PeerId::from_bytes(&rec.peer_id)
            .map_err(|e| invalid("capability record", format!("bad peer id: {e}")))?;
        if &peer_id != sender {
            return Err(invalid(
                "capability record",
                format!("record names {peer_id} but was sent by {sender}"),
            ));
        }
        let caps = rec
            .capabilities
            .ok_or_else(|| invalid("capability record", "no capabilities"))?;
        check_version(caps.protocol_version)?;
        if caps.software_version.len() > MAX_NAME_LEN || caps.device_name.len() > MAX_NAME_LEN {
            return Err(invalid("capability record", "name field too long"));
        }
        if !caps.train_tokens_per_sec.is_finite()
            || caps.train_tokens_per_sec < 0.0
            || !caps.bandwidth_bytes_per_sec.is_finite()
            || caps.bandwidth_bytes_per_sec < 0.0
        {
            return Err(invalid(
                "capability record",
                "measured figure not a finite >= 0",
            ));
        }
        if rec.listen_addrs.len() > MAX_RECORD_ADDRS {
            return Err(invalid(
                "capability record",
                format!(
                    "{} addresses, at most {MAX_RECORD_ADDRS}",
                    rec.listen_addrs.len()
                ),
            ));
        }
        let addrs = rec
            .listen_addrs
            .into_iter()
            .map(|b| {
                Multiaddr::try_from(b)
                    .map_err(|e| invalid("capability record", format!("bad address: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            peer_id,
            capabilities: caps,
            addrs,
            issued_at_ms: rec.issued_at_ms,
        })
    }

    pub fn to_wire(&self) -> v1::CapabilityRecord {
        v1::CapabilityRecord {
            protocol_version: PROTOCOL_VERSION,
            peer_id: self.peer_id.to_bytes(),
            capabilities: Some(self.capabilities.clone()),
            listen_addrs: self
                .addrs
                .iter()
                .take(MAX_RECORD_ADDRS)
                .map(|a| a.to_vec())
                .collect(),
            issued_at_ms: self.issued_at_ms,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample(peer: PeerId) -> PeerRecord {
        PeerRecord {
            peer_id: peer,
            capabilities: measure_local(),
            addrs: vec!["/ip4/127.0.0.1/tcp/5".parse().unwrap()],
            issued_at_ms: 7,
        }
    }

    #[test]
    fn record_round_trips_through_the_wire() {
        let peer = PeerId::random();
        let rec = sample(peer);
        assert_eq!(PeerRecord::from_wire(rec.to_wire(), &peer).unwrap(), rec);
    }

    #[test]
    fn record_about_someone_else_is_refused() {
        let rec = sample(PeerId::random());
        assert!(PeerRecord::from_wire(rec.to_wire(), &PeerId::random()).is_err());
    }

    #[test]
    fn other_protocol_version_is_refused_clearly() {
        let peer = PeerId::random();
        let mut wire = sample(peer).to_wire();
        wire.protocol_version = PROTOCOL_VERSION + 1;
        let err = PeerRecord::from_wire(wire, &peer).unwrap_err();
        assert!(matches!(err, DecodeError::Version { .. }), "{err}");
    }

    #[test]
    fn measured_machine_has_cpus_and_memory() {
        let c = measure_local();
        assert!(c.cpu_count >= 1);
        assert!(c.memory_bytes > 0);
        assert_eq!(figure(c.train_tokens_per_sec, "tok/s"), "not measured");
    }
}
